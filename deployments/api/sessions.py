"""`/v1/sessions`: CausVid sessions (open, show, next fragment, whole video, close). Thin: each route asks
the session service."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from ..router.service import Service
from .schemas import MP4, Deleted, FragmentCreate, SessionCreate, SessionObject, VideoJob, errors


def add_session_routes(app: FastAPI, svc: Service, guarded: list, common: tuple) -> None:
    sessions = svc.sessions

    @app.post("/v1/sessions", status_code=201, response_model=SessionObject, dependencies=guarded,
              tags=["sessions"], responses=errors(400, *common))
    async def create_session(body: SessionCreate):
        return await sessions.open(body.model_dump())

    @app.get("/v1/sessions/{session_id}", response_model=SessionObject, dependencies=guarded, tags=["sessions"],
             responses=errors(404, *common))
    async def get_session(session_id: str):
        return await sessions.view(session_id)

    @app.post("/v1/sessions/{session_id}/fragments", status_code=202, response_model=VideoJob,
              dependencies=guarded, tags=["sessions"], responses=errors(400, 404, 409, 410, 429, *common))
    async def create_fragment(session_id: str, body: FragmentCreate | None = None):
        return svc.jobs.view(await sessions.fragment(session_id, body.prompt if body else None))

    @app.get("/v1/sessions/{session_id}/video", response_class=StreamingResponse, dependencies=guarded,
             tags=["sessions"], responses={200: MP4, **errors(404, 409, 410, *common)})
    async def session_video(session_id: str):
        video = await sessions.video(session_id)
        return StreamingResponse(chunks(video), media_type="video/mp4",
                                 headers={"Content-Length": str(os.fstat(video.fileno()).st_size)})

    @app.delete("/v1/sessions/{session_id}", response_model=Deleted, dependencies=guarded, tags=["sessions"],
                responses=errors(404, *common))
    async def delete_session(session_id: str):
        return await sessions.close(session_id)


def chunks(f: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    """A file in chunks, closed at the end (Starlette reads a plain iterator in a thread): the router holds
    one chunk of a video at a time, not the video."""
    with f:
        while data := f.read(size):
            yield data
