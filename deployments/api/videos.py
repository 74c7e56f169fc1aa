"""`/v1/videos`: OpenAI-style video jobs (create, list, status, content, CausVid blocks, events, cancel,
delete). Thin: each route validates its HTTP shape and asks the job service."""
from __future__ import annotations

import json

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, StreamingResponse

from ..router.service import Service
from ..states import JobState
from .errors import ApiError
from .requests import parse_video_request, submit_video
from .schemas import MP4, SSE, Deleted, VideoJob, VideoList, errors

ID_PATTERN = r"^vid_[0-9a-f]{24}$"
STATUS_PATTERN = "^(" + "|".join(s.value for s in JobState) + ")$"
VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/VideoCreate"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/VideoCreateForm"}}}}}


def add_video_routes(app: FastAPI, svc: Service, guarded: list, common: tuple) -> None:
    jobs = svc.jobs

    @app.post("/v1/videos", status_code=202, response_model=VideoJob, dependencies=guarded, tags=["videos"],
              responses=errors(400, 403, 413, 415, 429, *common), openapi_extra=VIDEO_BODY)
    async def create_video(request: Request):
        body, image = await parse_video_request(request, svc.args.limits.max_upload_bytes)
        return await submit_video(svc, body, image)

    @app.get("/v1/videos", response_model=VideoList, dependencies=guarded, tags=["videos"],
             responses=errors(400, *common))
    async def list_videos(limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, pattern=ID_PATTERN),
                          model: str | None = Query(None, max_length=100),
                          status: str | None = Query(None, pattern=STATUS_PATTERN)):
        found, more = await jobs.list(limit, after, model, status)
        data = [jobs.view(j) for j in found]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/videos/{video_id}", response_model=VideoJob, dependencies=guarded, tags=["videos"],
             responses=errors(404, *common))
    async def get_video(video_id: str):
        return jobs.view(await jobs.job(video_id))

    @app.get("/v1/videos/{video_id}/content", response_class=FileResponse, dependencies=guarded, tags=["videos"],
             responses={200: MP4, **errors(404, 409, 410, *common)})
    async def video_content(video_id: str, variant: str = Query("video", pattern="^video$")):
        return FileResponse(await jobs.result_path(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.get("/v1/videos/{video_id}/blocks/{index}", response_class=FileResponse, dependencies=guarded,
             tags=["sessions"], responses={200: MP4, **errors(404, *common)})
    async def video_block(video_id: str, index: int):
        job = await jobs.job(video_id)
        path = jobs.block_path(job, index)
        if path is None:
            raise ApiError(404, f"video {video_id} has no block {index} (yet): it has {job.blocks}; blocks exist "
                                "for CausVid fragment jobs while and after they run", "block_not_found")
        return FileResponse(path, media_type="video/mp4")

    @app.get("/v1/videos/{video_id}/events", dependencies=guarded, tags=["videos"],
             responses={200: SSE, **errors(404, *common)})
    async def video_events(video_id: str):
        await jobs.job(video_id)  # 404 before the stream starts

        async def stream():
            async for ev in jobs.events(video_id):
                if ev["type"] == "job":
                    ev = {"type": "job", "job": jobs.view(ev["job"])}
                yield f"event: {ev['type']}\ndata: {json.dumps(jsonable_encoder(ev))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/videos/{video_id}/cancel", response_model=VideoJob, dependencies=guarded, tags=["videos"],
              responses=errors(404, *common))
    async def cancel_video(video_id: str):
        return jobs.view(await jobs.cancel(video_id))

    @app.delete("/v1/videos/{video_id}", response_model=Deleted, dependencies=guarded, tags=["videos"],
                responses=errors(404, 409, *common))
    async def delete_video(video_id: str):
        await jobs.delete(video_id)
        return {"id": video_id, "object": "video", "deleted": True}
