"""LightX2V's task API (`python -m lightx2v.server`) mapped onto wanserve's jobs, so its clients work here.

Same routes and bodies as lightx2v/server/api/tasks/*.py and service_routes.py; task_id = job id; its state
names are schemas.TASK_STATES. Differences, on purpose: `image_path` is base64 or a path under a configured
image root (no URLs, no arbitrary local paths); `save_result_path` is never written (fetch /result);
`infer_steps` is ignored (the model's step list is used, as LightX2V's distill models do); a full queue is
429 + Retry-After (LightX2V: 503); `target_height` / `target_width` / `model` may be given.
"""
from __future__ import annotations

import asyncio
import datetime as dt

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse

from ..router.service import Service
from ..states import JobState
from .errors import ApiError, bad_request
from .requests import submit_video
from .schemas import (
    MP4,
    TASK_STATES,
    QueueStatus,
    ServiceStatus,
    StopTaskResponse,
    TaskRequest,
    TaskResponse,
    TaskStatus,
    errors,
)


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t).isoformat()


def task_status(job) -> dict:
    return {"task_id": job.id, "status": TASK_STATES[job.state], "start_time": _iso(job.started_at or job.created_at),
            "end_time": _iso(job.finished_at), "error": job.error,
            "save_result_path": f"{job.id}.mp4" if job.state is JobState.completed else None,
            "progress": job.progress}


def add_lightx2v_routes(app: FastAPI, svc: Service, guarded: list, common: tuple) -> None:
    deps = guarded

    async def create(req: TaskRequest, image: bytes | str | None) -> dict:
        if req.target_video_length is not None and req.num_fragments > 1:
            raise bad_request("give num_fragments (CausVid) or target_video_length, not both", "num_fragments")
        body = {"prompt": req.prompt, "model": req.model, "negative_prompt": req.negative_prompt or None,
                "num_frames": req.target_video_length, "seed": req.seed,
                "num_fragments": req.num_fragments if req.num_fragments > 1 else None}
        if req.target_height or req.target_width:
            view = svc.catalog.model(req.model, image=bool(image))
            body["size"] = f"{req.target_width or view.cfg.target_width}x{req.target_height or view.cfg.target_height}"
        job = await submit_video(svc, {k: v for k, v in body.items() if v is not None}, image)
        return {"task_id": job["id"], "task_status": "pending", "save_result_path": f"{job['id']}.mp4"}

    @app.post("/v1/tasks/video", response_model=TaskResponse, dependencies=deps, tags=["lightx2v"],
              responses=errors(400, 403, 413, 429, *common))
    @app.post("/v1/tasks/video/", response_model=TaskResponse, dependencies=deps, include_in_schema=False)
    async def create_task(req: TaskRequest):
        if req.image_path.startswith(("http://", "https://")):
            raise bad_request("image_path URLs are not fetched: send the image as base64 or upload it to "
                              "/v1/tasks/video/form", "image_path", "url_not_supported")
        return await create(req, req.image_path or None)

    @app.post("/v1/tasks/video/form", response_model=TaskResponse, dependencies=deps, tags=["lightx2v"],
              responses=errors(400, 413, 429, *common))
    async def create_task_form(image_file: UploadFile | None = File(None), prompt: str = Form(""),
                               negative_prompt: str = Form(""), num_fragments: int = Form(1, ge=1),
                               infer_steps: int | None = Form(None), target_video_length: int | None = Form(None, ge=1),
                               seed: int | None = Form(None, ge=0, le=2**63 - 2), save_result_path: str = Form(""),
                               model: str | None = Form(None)):
        cap = svc.args.limits.max_upload_bytes
        image = None
        if image_file is not None and image_file.filename:
            image = await image_file.read(cap + 1)
            if len(image) > cap:
                raise ApiError(413, f"image_file is larger than the server accepts: at most {cap} bytes "
                                    "(limits.max_upload_bytes)", "upload_too_large", "image_file")
        req = TaskRequest(prompt=prompt, negative_prompt=negative_prompt, num_fragments=num_fragments,
                          infer_steps=infer_steps, target_video_length=target_video_length, seed=seed,
                          save_result_path=save_result_path, model=model)
        return await create(req, image)

    @app.get("/v1/tasks", dependencies=deps, tags=["lightx2v"], responses=errors(*common))
    @app.get("/v1/tasks/", dependencies=deps, include_in_schema=False)
    async def list_tasks() -> dict[str, TaskStatus]:
        jobs = await asyncio.to_thread(svc.store.list, 1000)
        return {j.id: task_status(j) for j in jobs}

    @app.get("/v1/tasks/queue/status", response_model=QueueStatus, dependencies=deps, tags=["lightx2v"],
             responses=errors(*common))
    async def queue_status():
        queued = await asyncio.to_thread(svc.store.queue_depth)
        running = svc.jobs.running_ids()
        cap = svc.args.max_queued_jobs
        return {"is_processing": bool(running), "current_task": running[0] if running else None,
                "pending_count": queued, "active_count": queued + len(running), "queue_size": cap,
                "queue_available": max(0, cap - queued)}

    @app.get("/v1/tasks/{task_id}/status", response_model=TaskStatus, dependencies=deps, tags=["lightx2v"],
             responses=errors(404, *common))
    async def get_task(task_id: str):
        return task_status(await svc.jobs.job(task_id))

    @app.get("/v1/tasks/{task_id}/result", response_class=FileResponse, dependencies=deps, tags=["lightx2v"],
             responses={200: MP4, **errors(404, 409, 410, *common)})
    async def task_result(task_id: str):
        path = await svc.jobs.result_path(task_id)
        return FileResponse(path, media_type="video/mp4", filename=f"{task_id}.mp4")

    @app.delete("/v1/tasks/all/running", response_model=StopTaskResponse, dependencies=deps, tags=["lightx2v"],
                responses=errors(*common))
    async def stop_all():
        ids = svc.jobs.running_ids() + [j.id for j in await asyncio.to_thread(svc.store.list, 1000, None, None, "queued")]
        for jid in ids:
            await svc.jobs.cancel(jid)
        return {"stop_status": "success", "reason": f"{len(ids)} task(s) cancelled."}

    @app.delete("/v1/tasks/{task_id}", response_model=StopTaskResponse, dependencies=deps, tags=["lightx2v"],
                responses=errors(*common))
    async def stop_task(task_id: str):
        job = await asyncio.to_thread(svc.store.get, task_id)
        if job is None or job.terminal:
            return {"stop_status": "do_nothing", "reason": "Task not found or already completed."}
        await svc.jobs.cancel(task_id)
        return {"stop_status": "success", "reason": "Task stopped successfully."}

    @app.get("/v1/service/status", response_model=ServiceStatus, dependencies=deps, tags=["lightx2v"],
             responses=errors(*common))
    async def service_status():
        counts = await asyncio.to_thread(svc.store.counts)
        running = svc.jobs.running_ids()
        return {"service_status": "busy" if running else "idle", "current_task": running[0] if running else None,
                "active_tasks": running, "pending_tasks": counts[JobState.queued],
                "queue_size": svc.args.max_queued_jobs, "total_tasks": sum(counts.values()),
                "completed_tasks": counts[JobState.completed], "failed_tasks": counts[JobState.failed]}

    @app.get("/v1/service/metadata", dependencies=deps, tags=["lightx2v"], responses=errors(*common))
    async def service_metadata() -> dict:
        models = await svc.models()
        return {"server": "wanserve", "models": models["data"], "loras": models["loras"],
                "max_queue_size": svc.args.max_queued_jobs}
