"""The HTTP API: the FastAPI app around the router's Service — error shape, auth, the web page, health,
readiness and models here; the routes of videos, sessions and LightX2V's task API in their own modules.

Every refusal is an `ApiError` rendered as `{"error": {"message", "type", "code", "param"}, "detail":
message}`; a body that fails validation is 422 naming the field and the rule. `/v1/*` needs
`Authorization: Bearer <token>` when the app has a token (`auth_token_env`); `/`, `/web/*`, `/healthz`,
`/readyz` and the OpenAPI spec are open. The route table: deployments/README.md.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.validation import format_validation_error

from ..router.service import Service
from .errors import ApiError
from .lightx2v import add_lightx2v_routes
from .schemas import Health, ModelList, Ready, VideoCreate, VideoCreateForm, errors, schema_extra
from .sessions import add_session_routes
from .videos import add_video_routes

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
COMMON = (401, 422, 503)
API_HINTS = {"extra_forbidden": "unknown field (see /docs for the accepted fields)", "missing": "required"}


def build_http_app(svc: Service, token: str | None) -> FastAPI:
    app = FastAPI(title="wanserve", version="1", description="Wan2.1 video generation on Ray Serve: OpenAI-style "
                  "video jobs, CausVid sessions, LightX2V-compatible tasks.")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return JSONResponse(ApiError(422, validation_message(e.errors()), "invalid_request").body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        msg = {404: "no such route: see /docs for the API", 405: "method not allowed on this route"}.get(
            e.status_code, str(e.detail))
        return JSONResponse(ApiError(e.status_code, msg, "http_error").body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def auth(request: Request) -> None:
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            svc.metrics.reject(401)
            raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <token>` (the value of "
                                "the server's auth_token_env variable)", "invalid_token",
                           headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(auth)]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web(name: str):
        path = (WEB_DIR / name).resolve()
        if path.parent != WEB_DIR or not path.is_file():
            raise ApiError(404, f"no web file {name!r}", "not_found")
        return FileResponse(path)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz():
        """Liveness: 200 while the router answers (probe it as liveness; readiness is /readyz)."""
        return await svc.health()

    @app.get("/readyz", response_model=Ready, tags=["service"], responses={503: {"model": Ready}})
    async def readyz():
        """Readiness: 200 once every model has a running replica; 503 naming the models still waiting."""
        waiting = await svc.waiting_for_replicas()
        return JSONResponse({"ready": not waiting, "waiting_for": waiting}, status_code=503 if waiting else 200)

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, responses=errors(*COMMON), tags=["service"])
    async def models():
        return await svc.models()

    add_video_routes(app, svc, guarded, COMMON)
    add_session_routes(app, svc, guarded, COMMON)
    add_lightx2v_routes(app, svc, guarded, COMMON)
    install_openapi(app)
    return app


def validation_message(errs: list[dict]) -> str:
    """Pydantic errors of a request as one line per field, in words a client can act on."""
    def size_hint(key: str, e) -> str | None:
        if e.get("type") == "string_pattern_mismatch" and key.endswith("size"):
            return "expected WIDTHxHEIGHT, e.g. 832x480"
        return None

    return format_validation_error(errs, "invalid request", one_line=True, root="body",
                                   drop_loc=("body", "query", "path"), show_input=False, messages=API_HINTS,
                                   rewrite=size_hint)


def install_openapi(app: FastAPI) -> None:
    """Add the bodies parsed by hand (POST /v1/videos) to the spec's components."""
    base = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            schema_extra([VideoCreate, VideoCreateForm]))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def read_token(env: str | None) -> str | None:
    """The bearer token from the env var the config names; the router refuses to start without it."""
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise RuntimeError(f"auth_token_env = {env!r} but the environment variable {env} is not set (or empty) in "
                           "the router's process: set it (on Kubernetes: the Secret) or set auth_token_env: null")
    return value
