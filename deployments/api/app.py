"""The HTTP API: OpenAI-style video jobs, CausVid sessions, the web page, health and models.

Built per router replica around its Service (`build_http_app(svc)`), so routes are plain closures and
the module reads top to bottom. Every refusal is an `ApiError` rendered as
`{"error": {"message", "type", "code", "param"}, "detail": message}`; validation errors of a body are
422 with the field and the rule in the message. `/v1/*` needs `Authorization: Bearer <token>` when the
app has a token (`auth_token_env`); `/`, `/web/*`, `/healthz` and the OpenAPI spec are open.

Routes (the OpenAPI spec at /openapi.json has their schemas; /docs renders it):
  POST /v1/videos                 JSON or multipart (image upload as `input_reference` or `image`) -> 202 job
  GET  /v1/videos                 newest first; `after=<id>` pages, `limit`, `model`, `status` filter
  GET  /v1/videos/{id}            status, progress, stage, timings, error
  GET  /v1/videos/{id}/content    the mp4 once completed (409 before, saying why)
  GET  /v1/videos/{id}/events     server-sent events: job snapshots, progress, blocks, until it ends
  GET  /v1/videos/{id}/blocks/{i} CausVid fragment jobs: block i's mp4 as soon as it is decoded
  POST /v1/videos/{id}/cancel     queued: cancelled now; running: stopped after the current step
  DELETE /v1/videos/{id}          forget a finished job and its files
  POST /v1/sessions               open a CausVid session (model, prompt, seed, size) -> 201
  GET  /v1/sessions/{id}          fragments, frames, cache bytes, tier, state
  POST /v1/sessions/{id}/fragments  the next fragment (optional new prompt) -> 202 job (kind fragment)
  GET  /v1/sessions/{id}/video    the whole video so far (mp4)
  DELETE /v1/sessions/{id}        close it and free its cache
  GET  /v1/models, GET /healthz, GET / (web page); LightX2V's /v1/tasks/* and /v1/service/* (lightx2v.py)
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError, bad_request
from .schemas import (
    Deleted,
    ErrorResponse,
    FragmentCreate,
    Health,
    LoraRef,
    ModelList,
    SessionCreate,
    SessionObject,
    VideoCreate,
    VideoCreateForm,
    VideoJob,
    VideoList,
    schema_extra,
)
from ..router.service import Service

log = logging.getLogger("ray.serve")

WEB_DIR = Path(__file__).parent / "web"
MP4 = {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}, "description": "mp4 video"}
SSE = {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "server-sent events"}
ID_PATTERN = r"^vid_[0-9a-f]{24}$"
STATUS_PATTERN = "^(queued|in_progress|completed|failed|cancelled)$"


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": ErrorResponse.model_fields["error"].description or "error"}
            for c in codes}


COMMON = (401, 422, 503)


def build_http_app(svc: Service, token: str | None) -> FastAPI:
    app = FastAPI(title="wanserve", version="1", description="Wan2.1 video generation on Ray Serve: OpenAI-style "
                  "video jobs, CausVid sessions, LightX2V-compatible tasks.")
    limits = svc.args.limits

    # ---- errors --------------------------------------------------------------------------------------------
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

    # ---- auth -----------------------------------------------------------------------------------------------
    async def auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            svc.metrics.reject(401)
            raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <token>` (the value of "
                                "the server's auth_token_env variable)", "invalid_token",
                           headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(auth)]

    # ---- page, health, models ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web(name: str):
        path = (WEB_DIR / name).resolve()
        if path.parent != WEB_DIR.resolve() or not path.is_file():
            raise ApiError(404, f"no web file {name!r}", "not_found")
        return FileResponse(path)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz():
        return await asyncio.to_thread(svc.health)

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, responses=errors(*COMMON), tags=["service"])
    async def models():
        return await asyncio.to_thread(svc.models)

    # ---- video jobs --------------------------------------------------------------------------------------------
    video_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/VideoCreate"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/VideoCreateForm"}}}}}

    @app.post("/v1/videos", status_code=202, response_model=VideoJob, dependencies=guarded, tags=["videos"],
              responses=errors(400, 403, 413, 415, 429, *COMMON), openapi_extra=video_body)
    async def create_video(request: Request):
        body, image = await parse_video_request(request, limits.max_upload_bytes)
        return await submit_video(svc, body, image)

    @app.get("/v1/videos", response_model=VideoList, dependencies=guarded, tags=["videos"],
             responses=errors(400, *COMMON))
    async def list_videos(limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, pattern=ID_PATTERN),
                          model: str | None = Query(None, max_length=100),
                          status: str | None = Query(None, pattern=STATUS_PATTERN)):
        jobs, more = await svc.list(limit, after, model, status)
        data = [svc.job_view(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/videos/{video_id}", response_model=VideoJob, dependencies=guarded, tags=["videos"],
             responses=errors(404, *COMMON))
    async def get_video(video_id: str):
        return svc.job_view(await svc.job(video_id))

    @app.get("/v1/videos/{video_id}/content", response_class=FileResponse, dependencies=guarded, tags=["videos"],
             responses={200: MP4, **errors(404, 409, 410, *COMMON)})
    async def video_content(video_id: str, variant: str = Query("video", pattern="^video$")):
        path = await svc.result_path(video_id)
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.get("/v1/videos/{video_id}/blocks/{index}", response_class=FileResponse, dependencies=guarded,
             tags=["sessions"], responses={200: MP4, **errors(404, *COMMON)})
    async def video_block(video_id: str, index: int):
        job = await svc.job(video_id)
        path = svc.block_path(job, index) if 0 <= index < 10000 else None
        if path is None or not path.is_file():
            raise ApiError(404, f"video {video_id} has no block {index} (yet): it has {svc.blocks(job)}; blocks "
                                "exist for CausVid fragment jobs while and after they run", "block_not_found")
        return FileResponse(path, media_type="video/mp4")

    @app.get("/v1/videos/{video_id}/events", dependencies=guarded, tags=["videos"],
             responses={200: SSE, **errors(404, *COMMON)})
    async def video_events(video_id: str):
        await svc.job(video_id)  # 404 before the stream starts

        async def stream():
            async for ev in svc.events(video_id):
                if ev["type"] == "job":
                    ev = {"type": "job", "job": svc.job_view(ev["job"])}
                yield f"event: {ev['type']}\ndata: {json.dumps(jsonable_encoder(ev))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/videos/{video_id}/cancel", response_model=VideoJob, dependencies=guarded, tags=["videos"],
              responses=errors(404, *COMMON))
    async def cancel_video(video_id: str):
        return svc.job_view(await svc.cancel(video_id))

    @app.delete("/v1/videos/{video_id}", response_model=Deleted, dependencies=guarded, tags=["videos"],
                responses=errors(404, 409, *COMMON))
    async def delete_video(video_id: str):
        job = await svc.job(video_id)
        if not job.terminal:
            raise ApiError(409, f"video {video_id} is {job.state.value}: cancel it first (POST "
                                f"/v1/videos/{video_id}/cancel), then delete it", "video_not_finished")
        await asyncio.to_thread(svc.store.delete, video_id)
        return {"id": video_id, "object": "video", "deleted": True}

    # ---- sessions -------------------------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201, response_model=SessionObject, dependencies=guarded,
              tags=["sessions"], responses=errors(400, *COMMON))
    async def create_session(body: SessionCreate):
        return await svc.open_session(body.model_dump())

    @app.get("/v1/sessions/{session_id}", response_model=SessionObject, dependencies=guarded, tags=["sessions"],
             responses=errors(404, *COMMON))
    async def get_session(session_id: str):
        return await svc.session_view(session_id)

    @app.post("/v1/sessions/{session_id}/fragments", status_code=202, response_model=VideoJob,
              dependencies=guarded, tags=["sessions"], responses=errors(400, 404, 409, 410, 429, *COMMON))
    async def create_fragment(session_id: str, body: FragmentCreate | None = None):
        job = await svc.fragment(session_id, body.prompt if body else None)
        return svc.job_view(job)

    @app.get("/v1/sessions/{session_id}/video", response_class=Response, dependencies=guarded, tags=["sessions"],
             responses={200: MP4, **errors(404, 409, 410, *COMMON)})
    async def session_video(session_id: str):
        return Response(await svc.session_video(session_id), media_type="video/mp4")

    @app.delete("/v1/sessions/{session_id}", response_model=Deleted, dependencies=guarded, tags=["sessions"],
                responses=errors(404, *COMMON))
    async def delete_session(session_id: str):
        return await svc.close_session(session_id)

    from .lightx2v import add_lightx2v_routes

    add_lightx2v_routes(app, svc, guarded, errors, COMMON)
    install_openapi(app)
    return app


# ---- request parsing (shared with the handle API in router.py) ----------------------------------------------

async def read_capped(request: Request, cap: int) -> bytes:
    """The body, refusing (413) more than cap bytes whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"request body is {declared} bytes; at most {cap} (limits.max_upload_bytes)",
                       "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"request body is larger than the server accepts: at most {cap} bytes "
                                "(limits.max_upload_bytes)", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_video_request(request: Request, cap: int) -> tuple[dict, bytes | str | None]:
    """(VideoCreate fields, image: upload bytes | JSON `image` string | None) of POST /v1/videos."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap + 65536:
            raise ApiError(413, f"upload is {declared} bytes; at most {cap} (limits.max_upload_bytes)",
                           "upload_too_large")
        try:
            form = await request.form(max_files=2, max_fields=32, max_part_size=cap)
        except Exception as e:
            raise bad_request(f"malformed form data: {e}", None, "invalid_form") from None
        fields: dict[str, Any] = {}
        image: bytes | str | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in ("input_reference", "image"):
                    raise bad_request(f"unexpected file field {key!r}: upload the image as `input_reference`", key)
                data = await value.read(cap + 1)
                if len(data) > cap:
                    raise ApiError(413, f"{key} is larger than the server accepts: at most {cap} bytes "
                                        "(limits.max_upload_bytes); send a smaller image", "upload_too_large", key)
                image = data
            elif key == "image" and value:
                image = value
            elif key == "loras":
                fields[key] = _form_loras(value)
            elif value != "":
                fields[key] = value
        try:
            body = VideoCreate.model_validate(fields).model_dump(exclude_none=True)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return body, image
    if ctype not in ("application/json", ""):
        raise ApiError(415, f"content-type {ctype!r} is not accepted: send application/json or multipart/form-data",
                       "unsupported_media_type")
    raw = await read_capped(request, cap + 65536)
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object with at least a `prompt`", None, "invalid_json")
    try:
        body = VideoCreate.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    return body, body.pop("image", None)


def _form_loras(value: str) -> list:
    value = value.strip()
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"loras: not a JSON list ({e}); or send comma-separated names", "loras") from None
    return [x.strip() for x in value.split(",") if x.strip()]


async def submit_video(svc: Service, body: dict, image: bytes | str | None) -> dict:
    """Validate, store the image, queue: the job as the API shows it."""
    path = None
    if isinstance(image, bytes):
        path = await asyncio.to_thread(svc.catalog.store_image, image, "input_reference")
    elif isinstance(image, str) and image:
        path = await asyncio.to_thread(svc.catalog.image_field, image)
    if body.get("loras"):
        body["loras"] = [x if isinstance(x, str) else (x.model_dump() if isinstance(x, LoraRef) else x)
                         for x in body["loras"]]
    view, req = svc.catalog.video_request(body, path)
    return svc.job_view(await svc.submit(view.name, req))


def validation_message(errs: list[dict]) -> str:
    """Pydantic errors as one line per field, in words a client can act on."""
    lines = []
    for e in errs:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        kind, msg = e.get("type", ""), e.get("msg", "invalid")
        if kind == "extra_forbidden":
            msg = "unknown field (see /docs for the accepted fields)"
        elif kind == "missing":
            msg = "required"
        elif kind == "string_pattern_mismatch" and field.endswith("size"):
            msg = "expected WIDTHxHEIGHT, e.g. 832x480"
        lines.append(f"{field}: {msg}")
    return "invalid request: " + "; ".join(lines)


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
