"""The router's job service: queue a validated job, answer for it, relay its events, store its outcome.

Results are written here, under `<state_dir>/results/`, from the bytes the generators stream back, so GPU
pods need no shared volume. Every blocking call (SQLite, files) runs in a thread; a job's view is built
from its row alone (its block count is stored), so listing 100 jobs touches no directory.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Protocol

from model.config import format_size

from ..api.errors import ApiError, bad_request, not_found
from ..config import AppArgs, retry_after_s
from ..loops import LoopErrors
from ..states import JobKind, JobState
from ..storage.jobs import Job, JobStore
from .catalog import Catalog, load_image
from .dispatcher import ModelDispatcher
from .events import EventHub
from .metrics import Metrics

log = logging.getLogger("ray.serve")

PROGRESS_WRITE_S = 0.2


class SessionSide(Protocol):
    """What the job service asks of the session service (router/sessions.py)."""

    async def owner(self, session_id: str | None) -> str | None: ...
    async def fragment_payload(self, job: Job, with_state: bool) -> dict: ...
    async def after_fragment(self, job: Job, outcome: dict) -> None: ...
    async def end(self, session_id: str, status: str, why: str) -> None: ...


class JobService:
    def __init__(self, args: AppArgs, store: JobStore, catalog: Catalog, metrics: Metrics, errors: LoopErrors):
        self.args, self.store, self.catalog, self.metrics, self.errors = args, store, catalog, metrics, errors
        self.hub = EventHub()
        self.dispatchers: dict[str, ModelDispatcher] = {}
        self.sessions: SessionSide | None = None
        self._percent: dict[str, int] = {}  # running job -> overall progress so far (never goes back)
        self._written: dict[str, tuple[float, str | None]] = {}  # running job -> (time, stage) of its last write
        self._submit_lock = asyncio.Lock()

    # ---- the API's calls ----------------------------------------------------------------------------
    async def submit(self, model: str, request: dict, kind: JobKind = JobKind.video,
                     session_id: str | None = None) -> Job:
        """Queue a validated job; 429 + Retry-After when max_queued_jobs are waiting."""
        async with self._submit_lock:
            queued = await asyncio.to_thread(self.store.queue_depth)
            if queued >= self.args.max_queued_jobs:
                d = self.dispatchers[model]
                wait = retry_after_s(queued, max(1, len(d.replicas)), d.mean_duration())
                self.metrics.reject(429)
                raise ApiError(429, f"the queue is full ({queued} jobs waiting, max_queued_jobs = "
                                    f"{self.args.max_queued_jobs}); retry after {wait} s", "queue_full",
                               headers={"Retry-After": str(wait)})
            job = await asyncio.to_thread(self.store.create, model, request, kind, session_id)
        self.dispatchers[model].wake.set()
        return job

    async def job(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise not_found("video", job_id)
        return job

    async def cancel(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.cancel, job_id)
        if job is None:
            raise not_found("video", job_id)
        if job.state is JobState.in_progress:
            self.dispatchers[job.model].cancel(job_id)
        if job.state is JobState.cancelled:
            self.hub.publish(job_id)
        return job

    async def list(self, limit: int, after: str | None, model: str | None = None,
                   state: str | None = None) -> tuple[list[Job], bool]:
        try:
            jobs = await asyncio.to_thread(self.store.list, limit + 1, after, model, state)
        except KeyError:
            raise bad_request(f"unknown cursor {after!r}: pass the id of the last video of the previous page",
                              "after") from None
        return jobs[:limit], len(jobs) > limit

    async def result_path(self, job_id: str) -> Path:
        job = await self.job(job_id)
        if job.state is not JobState.completed:
            hint = {"queued": "it is waiting in the queue", "in_progress": f"it is running ({job.progress}%)",
                    "failed": f"it failed: {job.error}", "cancelled": "it was cancelled"}[job.state.value]
            raise ApiError(409, f"video {job_id} has no content: {hint}", f"video_{job.state.value}")
        path = self.store.result_path(job)
        if not await asyncio.to_thread(path.is_file):
            raise ApiError(410, f"the file of video {job_id} is gone (deleted by retention)", "content_gone")
        return path

    def block_path(self, job: Job, index: int) -> Path | None:
        """Block `index` of a fragment job if it has been written (the job's row counts them)."""
        return self.store.files.block_path(job.id, index) if 0 <= index < job.blocks else None

    async def delete(self, job_id: str) -> None:
        job = await self.job(job_id)
        if not job.terminal:
            raise ApiError(409, f"video {job_id} is {job.state.value}: cancel it first (POST "
                                f"/v1/videos/{job_id}/cancel), then delete it", "video_not_finished")
        await asyncio.to_thread(self.store.delete, job_id)

    def running_ids(self) -> list[str]:
        return [jid for d in self.dispatchers.values() for jid in d.running]

    def events(self, job_id: str):
        return self.hub.events(job_id, self.job)

    # ---- the dispatchers' host (dispatcher.DispatchHost) ---------------------------------------------
    async def session_owner(self, session_id: str | None) -> str | None:
        return await self.sessions.owner(session_id)

    def replica_died(self, model: str) -> None:
        self.metrics.failure(model, "replica_died")

    def depth(self, model: str, queued: int, running: int) -> None:
        self.metrics.depth(model, queued, running)

    def runtime(self, model: str, replicas: dict[str, dict]) -> None:
        self.metrics.kernels(model, [r.get("runtime") or {} for r in replicas.values()])

    async def payload(self, job: Job, with_state: bool) -> dict:
        """What the generator gets: the stored request, with the image as an array (GPU pods have no
        state volume) or, for a fragment, the session's stored state when it has to be rebuilt."""
        if job.kind == JobKind.fragment:
            return await self.sessions.fragment_payload(job, with_state)
        req = dict(job.request, job_id=job.id)
        if req.get("image"):
            try:
                req["image"] = await asyncio.to_thread(load_image, req["image"])
            except OSError as e:
                raise RuntimeError(f"the job's image {req['image']} cannot be read any more: {e}") from None
        return req

    async def on_event(self, job: Job, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "progress":
            step, total, stage = int(ev.get("step", 0)), int(ev.get("total", 0)), ev.get("stage")
            self._percent[job.id] = max(self._percent.get(job.id, 0), overall_percent(job.kind, stage, step, total))
            # one durable write per PROGRESS_WRITE_S (and at every stage change and stage end) is enough for
            # pollers; each write is an fsync. SSE subscribers still get every event.
            now, (when, last_stage) = time.monotonic(), self._written.get(job.id, (0.0, None))
            if stage != last_stage or step >= total or now - when >= PROGRESS_WRITE_S:
                self._written[job.id] = (now, stage)
                await asyncio.to_thread(self.store.progress, job.id, step, total, stage, job.attempts,
                                        self._percent[job.id])
        elif kind == "block":
            try:
                await asyncio.to_thread(self.store.write_block, job.id, int(ev["index"]), ev["video"], job.attempts)
            except Exception as e:  # the job goes on; its whole video still arrives with the result
                self.errors.record("block_write", f"job {job.id} block {ev.get('index')}", e)
        elif kind == "retry":
            log.warning("job %s: worker group failed, replica retries: %s", job.id, ev.get("reason"))
            self.metrics.failure(job.model, "worker_died")
        self.hub.publish(job.id, {k: v for k, v in ev.items() if k != "video"})

    async def finish(self, job: Job, attempt: int, outcome: dict | None) -> None:
        store, kind = self.store, (outcome or {}).get("type")
        self._percent.pop(job.id, None)
        self._written.pop(job.id, None)
        fresh = await asyncio.to_thread(store.get, job.id)
        queue_s = (fresh.started_at - fresh.created_at) if fresh and fresh.started_at else None
        if kind == "result":
            timings = dict(outcome.get("timings") or {})
            if queue_s is not None:
                timings["queue"] = queue_s
            timings["total"] = time.time() - job.created_at
            if outcome.get("fragment") is not None:
                timings["fragment"] = outcome["fragment"]
            if job.kind == JobKind.fragment:
                await self.sessions.after_fragment(job, outcome)
            name = await asyncio.to_thread(store.write_result, job.id, outcome["video"])
            done = await asyncio.to_thread(store.complete, job.id, name, timings, attempt)
            self.metrics.finished(job.model, done.state.value if done else "stale", timings)
        elif kind == "cancelled":
            await asyncio.to_thread(store.finish_cancelled, job.id, attempt)
            self.metrics.finished(job.model, "cancelled")
        else:
            why = (outcome or {}).get("kind", "failure")
            message = (outcome or {}).get("message", "the job ended without a result")
            if why == "replica_died" and attempt < self.args.max_attempts:
                log.warning("job %s: %s; requeued (attempt %d of %d)", job.id, message, attempt,
                            self.args.max_attempts)
                await asyncio.to_thread(store.requeue, job.id, attempt)
            else:
                if why == "replica_died":
                    message += f"; given up after {attempt} attempt(s)"
                if why == "lost" and job.session_id:
                    await self.sessions.end(job.session_id, "lost", message)
                await asyncio.to_thread(store.fail, job.id, message, None, attempt)
                self.metrics.finished(job.model, "failed")
                self.metrics.failure(job.model, why)
        self.hub.publish(job.id)

    # ---- views ----------------------------------------------------------------------------------------
    def view(self, job: Job) -> dict:
        """The job as the API shows it: from its row alone (no file or database access)."""
        r, view = job.request, self.catalog.views.get(job.model)
        timings = {k: float(v) for k, v in (job.timings or {}).items() if isinstance(v, (int, float))}
        fragment = timings.pop("fragment", None)
        frames, fps = r.get("num_frames"), view.cfg.fps if view else 16
        if job.kind == JobKind.fragment and view is not None:
            frames = view.frames_per_fragment
        size = format_size(r["height"], r["width"]) if "height" in r else None
        return {"id": job.id, "object": "video", "kind": job.kind.value, "model": job.model,
                "status": job.state.value, "progress": job.progress, "stage": job.stage, "step": job.step,
                "total_steps": job.total, "created_at": int(job.created_at), "started_at": _t(job.started_at),
                "completed_at": _t(job.finished_at), "prompt": r.get("prompt"), "size": size, "num_frames": frames,
                "seconds": f"{frames / fps:.2f}" if frames else None, "seed": r.get("seed"),
                "loras": [{"name": x["name"], "strength": x["strength"]} for x in r.get("loras") or ()],
                "session_id": job.session_id, "fragment": None if fragment is None else int(fragment),
                "blocks": job.blocks, "attempts": job.attempts, "timings": timings,
                "error": {"code": "generation_failed", "message": job.error} if job.state is JobState.failed
                else None,
                "url": f"/v1/videos/{job.id}/content" if job.state is JobState.completed else None}


def overall_percent(kind: str, stage: str | None, step: int, total: int) -> int:
    """A job's overall progress from its current stage: the DiT steps are most of the work."""
    frac = step / total if total > 0 else 0.0
    if stage == "dit":
        return int(8 + 87 * frac) if kind == JobKind.fragment else int(8 + 82 * frac)
    if stage == "vae":
        return 0 if kind == JobKind.fragment else 95  # fragments decode block by block, between DiT steps
    return {"lora": 1, "restore": 2, "text": 4, "image": 6}.get(stage or "", 0)


def _t(x: float | None) -> int | None:
    return None if x is None else int(x)
