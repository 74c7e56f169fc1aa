"""The router: the application's ingress deployment (HTTP) and its handle API (callers inside Ray).

One replica (it owns the SQLite job store; a second router would run a second set of dispatchers over the
same queue). If it dies, Serve starts a new one that opens the same state_dir, recovers the jobs and serves
finished results. The methods below are the handle API that `deployments.client.HandleClient` uses: the
same operations as the HTTP routes, plain dicts in and out (errors arrive as ApiError, status and message).
"""
from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError
from ray import serve

from ..api.app import build_http_app, read_token, validation_message
from ..api.errors import ApiError
from ..api.requests import submit_video
from ..api.schemas import SessionCreate, VideoCreate
from ..config import parse_args
from .service import Service

log = logging.getLogger("ray.serve")


@serve.ingress()
class Router:
    async def __init__(self, args: dict, **generators):
        self.args = parse_args(args)
        self.token = read_token(self.args.auth_token_env)
        self.svc = Service(self.args, generators)
        await self.svc.start()
        log.info("router ready: models %s, state in %s", list(generators), self.args.state_dir)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.svc, self.token)

    async def __del__(self):
        await self.svc.stop()

    async def submit(self, body: dict, image: bytes | str | None = None) -> dict:
        """Like POST /v1/videos: body = the JSON fields; image = file bytes, base64 or a rooted path."""
        try:
            parsed = VideoCreate.model_validate(body).model_dump(exclude_none=True)
        except ValidationError as e:
            raise ApiError(422, validation_message(e.errors()), "invalid_request") from None
        image = image if image is not None else parsed.pop("image", None)
        return await submit_video(self.svc, parsed, image)

    async def get(self, job_id: str) -> dict:
        return self.svc.jobs.view(await self.svc.jobs.job(job_id))

    async def cancel(self, job_id: str) -> dict:
        return self.svc.jobs.view(await self.svc.jobs.cancel(job_id))

    async def content(self, job_id: str) -> bytes:
        return await asyncio.to_thread((await self.svc.jobs.result_path(job_id)).read_bytes)

    async def block(self, job_id: str, index: int) -> bytes | None:
        path = self.svc.jobs.block_path(await self.svc.jobs.job(job_id), index)
        return None if path is None else await asyncio.to_thread(path.read_bytes)

    async def list(self, limit: int = 20, after: str | None = None) -> dict:
        jobs, more = await self.svc.jobs.list(limit, after)
        return {"data": [self.svc.jobs.view(j) for j in jobs], "has_more": more}

    async def models(self) -> dict:
        return await self.svc.models()

    async def open_session(self, body: dict) -> dict:
        return await self.svc.sessions.open(SessionCreate.model_validate(body).model_dump())

    async def fragment(self, session_id: str, prompt: str | None = None) -> dict:
        return self.svc.jobs.view(await self.svc.sessions.fragment(session_id, prompt))

    async def session(self, session_id: str) -> dict:
        return await self.svc.sessions.view(session_id)

    async def session_video(self, session_id: str) -> bytes:
        """The whole video as bytes (a handle answer is one object; HTTP streams it from disk instead)."""
        video = await self.svc.sessions.video(session_id)
        with video:
            return await asyncio.to_thread(video.read)

    async def close_session(self, session_id: str) -> dict:
        return await self.svc.sessions.close(session_id)
