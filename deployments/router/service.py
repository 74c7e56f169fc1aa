"""The router's job and session service: everything the HTTP routes and handle callers do, minus HTTP.

One instance per router replica (there is one router replica: it owns the SQLite job store). It opens
the store and calls `recover()` (jobs a dead router left running are requeued, or failed after
`max_attempts` tries), tells every generator to drop work a dead router had started, then runs one
dispatcher per model (dispatch.py) and a housekeeping loop (retention of jobs, results and sessions).

Results are written here, under `<state_dir>/results/`, from the bytes the generators stream back, so
GPU pods need no shared volume; `GET /v1/videos/{id}/content` serves the file. CausVid fragments also
leave one mp4 per decoded block (`<id>.block<k>.mp4`) as soon as it arrives.

Every blocking call (SQLite, files) runs in a thread: the router's event loop only waits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

from ..config import AppArgs, format_size, retry_after_s
from .dispatcher import REPLICA_GONE, ModelDispatcher, SessionLost
from ..api.errors import ApiError, bad_request, not_found
from ..states import JobState
from ..storage.jobs import Job, JobStore
from .metrics import Metrics
from ..storage.sessions import SessionStore, new_session_id
from .catalog import Catalog, load_image

log = logging.getLogger("ray.serve")

HOUSEKEEPING_S = 60.0
SESSION_CALL_TIMEOUT_S = 600.0
PROGRESS_WRITE_S = 0.2


def _t(x: float | None) -> int | None:
    return None if x is None else int(x)


class Service:
    def __init__(self, args: AppArgs, handles: dict[str, Any]):
        self.args = args
        state = Path(args.state_dir)
        self.store = JobStore(state / "jobs.sqlite", state / "results", retention_s=args.retention_s)
        self.sessions = SessionStore(state)
        self.catalog = Catalog(args)
        self.metrics = Metrics()
        self.handles = handles
        self.dispatchers = {name: ModelDispatcher(self, name, h) for name, h in handles.items()}
        self._subs: dict[str, set[asyncio.Queue]] = {}
        self._owners: dict[str, str | None] = {}
        self._percent: dict[str, int] = {}  # running job -> overall progress so far (never goes back)
        self._written: dict[str, tuple[float, str | None]] = {}  # running job -> (time, stage) of its last write
        self._submit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        n = await asyncio.to_thread(self.store.recover, self.args.max_attempts)
        if n:
            log.info("router: %d job(s) were running when the previous router stopped; requeued or failed", n)

        self._tasks.append(asyncio.get_running_loop().create_task(self._start_dispatch()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._housekeeping()))

    async def _start_dispatch(self) -> None:
        """Generators still running jobs of a previous router are told to stop them (their results would
        have no one to go to); then dispatching begins."""

        async def stop_orphans(name: str, handle) -> None:
            with contextlib.suppress(Exception):
                stopped = await handle.broadcast("cancel_orphans").results_async(timeout_s=10, return_exceptions=True)
                stopped = [s for s in stopped if isinstance(s, str)]
                if stopped:
                    log.info("router: %s stopped %d orphaned job(s): %s", name, len(stopped), stopped)

        await asyncio.gather(*(stop_orphans(n, h) for n, h in self.handles.items()))
        for d in self.dispatchers.values():
            d.start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for d in self.dispatchers.values():
            await d.stop()

    async def _housekeeping(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.purge)
                s = self.args.sessions
                for sid in await asyncio.to_thread(self.sessions.expired, s.retention_s):
                    await self._end_session(sid, "closed", f"expired: idle for more than {s.retention_s:.0f} s")
                await asyncio.to_thread(self.sessions.purge, self.args.retention_s)
                await asyncio.to_thread(purge_uploads, self.args.uploads_dir, self.args.retention_s)
            await asyncio.sleep(HOUSEKEEPING_S)

    # ---- jobs ----------------------------------------------------------------------------------------------
    async def submit(self, model: str, request: dict, kind: str = "video", session_id: str | None = None) -> Job:
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
            self.publish(job_id)
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
        if not path.is_file():
            raise ApiError(410, f"the file of video {job_id} is gone (deleted by retention)", "content_gone")
        return path

    def block_path(self, job: Job, index: int) -> Path:
        return self.store.results_dir / f"{job.id}.block{index:04d}.mp4"

    def blocks(self, job: Job) -> int:
        return sum(1 for _ in self.store.results_dir.glob(f"{job.id}.block*.mp4"))

    # ---- events from the dispatchers ----------------------------------------------------------------------
    async def payload(self, job: Job, replica: str, with_state: bool = False) -> dict:
        """What the generator gets: the stored request, with the image as an array (GPU pods have no
        state volume) or, for a fragment, the session's stored state when it has to be rebuilt."""
        req = dict(job.request)
        req["job_id"] = job.id
        if job.kind == "fragment":
            row = await asyncio.to_thread(self.sessions.get, job.session_id)
            if row is None or row["status"] != "active":
                raise SessionLost(f"session {job.session_id} is {row['status'] if row else 'unknown'}")
            req["session_id"] = job.session_id
            if with_state:
                state = await asyncio.to_thread(self.sessions.load_state, job.session_id)
                if state is None:
                    raise SessionLost(f"session {job.session_id} was lost with its replica and its stored state "
                                      "is gone; open a new session")
                req["state"] = state
            return req
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
            pct = overall_percent(job.kind, stage, step, total)
            last = self._percent.get(job.id, 0)
            self._percent[job.id] = max(last, pct)
            # one durable write per PROGRESS_WRITE_S (and at every stage change and stage end) is enough for
            # pollers; each write is an fsync. SSE subscribers still get every event.
            now, (when, last_stage) = time.monotonic(), self._written.get(job.id, (0.0, None))
            if stage != last_stage or step >= total or now - when >= PROGRESS_WRITE_S:
                self._written[job.id] = (now, stage)
                await asyncio.to_thread(self.store.progress, job.id, step, total, stage, job.attempts,
                                        self._percent[job.id])
        elif kind == "block":
            path = self.block_path(job, int(ev["index"]))
            await asyncio.to_thread(_write_atomic, path, ev["video"])
        elif kind == "retry":
            log.warning("job %s: worker group failed, replica retries: %s", job.id, ev.get("reason"))
            self.metrics.failure(job.model, "worker_died")
        self.publish(job.id, {k: v for k, v in ev.items() if k != "video"})

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
            if job.kind == "fragment":
                await self._after_fragment(job, outcome)
            name = await asyncio.to_thread(store.write_result, job.id, outcome["video"])
            done = await asyncio.to_thread(store.complete, job.id, name, timings, attempt)
            state = done.state.value if done else "stale"
            self.metrics.finished(job.model, state, timings)
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
                    await self._end_session(job.session_id, "lost", message)
                await asyncio.to_thread(store.fail, job.id, message, None, attempt)
                self.metrics.finished(job.model, "failed")
                self.metrics.failure(job.model, why)
        self.publish(job.id)

    # ---- live events (SSE) ---------------------------------------------------------------------------------
    def publish(self, job_id: str, event: dict | None = None) -> None:
        for q in list(self._subs.get(job_id, ())):
            q.put_nowait(event or {"type": "update"})

    async def events(self, job_id: str, heartbeat_s: float = 15.0) -> AsyncIterator[dict]:
        """The job as it is now, then every event until it ends (`job` snapshots after state changes)."""
        q: asyncio.Queue = asyncio.Queue()
        self._subs.setdefault(job_id, set()).add(q)
        try:
            job = await self.job(job_id)
            yield {"type": "job", "job": job}
            while not job.terminal:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=heartbeat_s)
                except asyncio.TimeoutError:
                    yield {"type": "heartbeat"}
                    job = await self.job(job_id)
                    continue
                job = await self.job(job_id)
                if ev.get("type") in ("progress", "block", "retry", "started"):
                    yield ev
                if ev.get("type") in ("update", "started") or job.terminal:
                    yield {"type": "job", "job": job}
        finally:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    self._subs.pop(job_id, None)

    # ---- sessions ---------------------------------------------------------------------------------------------
    def session_owner(self, session_id: str | None) -> str | None:
        if session_id is None:
            return None
        if session_id not in self._owners:
            row = self.sessions.get(session_id)
            self._owners[session_id] = row["replica"] if row else None
        return self._owners[session_id]

    def _set_owner(self, session_id: str, replica: str | None) -> None:
        self._owners[session_id] = replica

    async def open_session(self, body: dict) -> dict:
        view, req = self.catalog.session_request(body)
        d = self.dispatchers[view.name]
        await d.poll(force=True)
        if not d.replicas:
            raise ApiError(503, f"model {view.name} has no running replica yet; retry shortly", "no_replica",
                           headers={"Retry-After": "5"})
        idle = d.idle()
        replica = d.pick(idle or list(d.replicas))
        sid = new_session_id()
        call = self.handles[view.name].options(method_name="open_session")
        try:
            res = await asyncio.wait_for(call.remote(sid, req["prompt"], req["seed"], req["height"], req["width"],
                                                     route_to=replica), SESSION_CALL_TIMEOUT_S)
        except REPLICA_GONE as e:
            raise ApiError(503, f"the replica died while opening the session ({type(e).__name__}); retry",
                           "replica_died", headers={"Retry-After": "5"}) from None
        except (ValueError, KeyError) as e:  # RequestError and friends from the model
            raise bad_request(_cause(e), "prompt") from None
        await asyncio.to_thread(self.sessions.create, sid, view.name, req["prompt"], req["seed"], req["height"],
                                req["width"], res["replica"], res["info"])
        await asyncio.to_thread(self.sessions.save_state, sid, res["state"])
        self._set_owner(sid, res["replica"])
        return await self.session_view(sid)

    async def active_session(self, session_id: str) -> dict:
        row = await asyncio.to_thread(self.sessions.get, session_id)
        if row is None:
            raise not_found("session", session_id)
        if row["status"] != "active":
            why = row["error"] or ("it was deleted" if row["status"] == "closed" else "it was lost")
            raise ApiError(410, f"session {session_id} is {row['status']}: {why}. Open a new session "
                                "(POST /v1/sessions)", f"session_{row['status']}")
        return row

    async def fragment(self, session_id: str, prompt: str | None) -> Job:
        row = await self.active_session(session_id)
        if prompt is not None:
            prompt = self.catalog.prompt(prompt)
        jobs = await asyncio.to_thread(self.store.session_jobs, session_id)
        pending = sum(1 for j in jobs if not j.terminal)
        limit = self.args.sessions.max_fragments
        if row["fragments"] + pending >= limit:
            raise ApiError(409, f"session {session_id} has {row['fragments']} fragment(s) and {pending} pending; at "
                                f"most {limit} per session (sessions.max_fragments)", "too_many_fragments")
        await asyncio.to_thread(self.sessions.update, session_id)
        return await self.submit(row["model"], {"prompt": prompt}, "fragment", session_id)

    async def _after_fragment(self, job: Job, outcome: dict) -> None:
        sid = job.session_id
        info = outcome.get("info") or {}
        row = await asyncio.to_thread(self.sessions.get, sid)
        if row is None or row["status"] != "active":
            return  # deleted meanwhile: keep no state for it
        if outcome.get("state") is not None:
            await asyncio.to_thread(self.sessions.save_state, sid, outcome["state"])
        await asyncio.to_thread(self.sessions.update, sid, replica=outcome.get("replica"),
                                fragments=int(info.get("fragments", 0)), info=info)
        self._set_owner(sid, outcome.get("replica"))

    async def session_view(self, session_id: str) -> dict:
        row = await asyncio.to_thread(self.sessions.get, session_id)
        if row is None:
            raise not_found("session", session_id)
        info, status, tier = dict(row["info"]), row["status"], None
        if status == "active":
            live = await self._on_owner(session_id, "session_info", timeout=10)
            if live:
                info.update(live)
                tier = live.get("tier")
                status = "idle" if tier == "idle" else "active"
            else:
                status = "evicted"
        jobs = await asyncio.to_thread(self.store.session_jobs, session_id)
        mem = info.get("memory_bytes")
        return {"id": session_id, "model": row["model"], "status": status, "prompt": row["prompt"],
                "seed": row["seed"], "size": format_size(row["height"], row["width"]),
                "created_at": int(row["created_at"]), "last_used_at": int(row["last_used"]),
                "fragments": int(info.get("fragments", row["fragments"]) or 0),
                "frames": int(info.get("frames", 0) or 0),
                "latent_frames": int(info.get("latent_frames", 0) or 0),
                "cache_bytes": int(info.get("cache_bytes", 0) or 0) if tier is not None else 0,
                "memory_bytes": (sum(mem.values()) if isinstance(mem, dict) else int(mem or 0)) if tier else 0,
                "tier": tier, "replica": row["replica"] if tier else None, "jobs": [j.id for j in jobs],
                "error": row["error"]}

    async def _on_owner(self, session_id: str, method: str, *args, timeout: float = 10, **kw) -> Any:
        """Call a session method on the replica that holds the session; None if it is gone."""
        row = await asyncio.to_thread(self.sessions.get, session_id)
        d = self.dispatchers.get(row["model"]) if row else None
        if d is None or row["replica"] is None:
            return None
        if not d.alive(row["replica"]):
            await d.poll(force=True)
            if not d.alive(row["replica"]):
                return None
        try:
            call = self.handles[row["model"]].options(method_name=method)
            return await asyncio.wait_for(call.remote(session_id, *args, route_to=row["replica"], **kw), timeout)
        except (asyncio.TimeoutError, *REPLICA_GONE):
            return None

    async def session_video(self, session_id: str) -> bytes:
        row = await self.active_session(session_id)
        if row["fragments"] == 0:
            raise ApiError(409, f"session {session_id} has no frames yet: generate a fragment first "
                                f"(POST /v1/sessions/{session_id}/fragments)", "no_frames")
        res = await self._on_owner(session_id, "session_video", timeout=SESSION_CALL_TIMEOUT_S)
        if not res or res.get("missing"):
            state = await asyncio.to_thread(self.sessions.load_state, session_id)
            if state is None:
                await self._end_session(session_id, "lost", "its cache and its stored state are gone")
                raise ApiError(410, f"session {session_id} was lost: its cache and stored state are gone. Open a "
                                    "new session", "session_lost")
            d = self.dispatchers[row["model"]]
            await d.poll(force=True)
            if not d.replicas:
                raise ApiError(503, f"model {row['model']} has no running replica; retry shortly", "no_replica",
                               headers={"Retry-After": "5"})
            target = row["replica"] if d.alive(row["replica"]) else d.pick(d.idle() or list(d.replicas))
            call = self.handles[row["model"]].options(method_name="session_video")
            res = await asyncio.wait_for(call.remote(session_id, state=state, route_to=target), SESSION_CALL_TIMEOUT_S)
            await asyncio.to_thread(self.sessions.update, session_id, replica=res.get("replica"))
            self._set_owner(session_id, res.get("replica"))
        if not res.get("video"):
            raise ApiError(409, f"session {session_id} has no frames yet", "no_frames")
        return res["video"]

    async def close_session(self, session_id: str) -> dict:
        row = await asyncio.to_thread(self.sessions.get, session_id)
        if row is None:
            raise not_found("session", session_id)
        if row["status"] == "active":
            for j in await asyncio.to_thread(self.store.session_jobs, session_id):
                if not j.terminal:
                    await self.cancel(j.id)
            await self._end_session(session_id, "closed", "deleted by its owner")
        return {"id": session_id, "object": "session", "deleted": True}

    async def _end_session(self, session_id: str, status: str, why: str) -> None:
        await self._on_owner(session_id, "close_session", timeout=60)
        await asyncio.to_thread(self.sessions.update, session_id, status=status, error=why)
        await asyncio.to_thread(self.sessions.drop_state, session_id)
        self._owners.pop(session_id, None)

    # ---- views --------------------------------------------------------------------------------------------------
    def job_view(self, job: Job) -> dict:
        r, view = job.request, self.catalog.views.get(job.model)
        timings = {k: float(v) for k, v in (job.timings or {}).items() if isinstance(v, (int, float))}
        fragment = timings.pop("fragment", None)
        frames, fps = r.get("num_frames"), view.cfg.fps if view else 16
        if job.kind == "fragment" and view is not None:
            frames = view.frames_per_fragment
        size = format_size(r["height"], r["width"]) if "height" in r else None
        if job.kind == "fragment":
            row = self.sessions.get(job.session_id)
            size = format_size(row["height"], row["width"]) if row else None
        return {"id": job.id, "object": "video", "kind": job.kind, "model": job.model, "status": job.state.value,
                "progress": job.progress, "stage": job.stage, "step": job.step, "total_steps": job.total,
                "created_at": int(job.created_at), "started_at": _t(job.started_at),
                "completed_at": _t(job.finished_at), "prompt": r.get("prompt"), "size": size, "num_frames": frames,
                "seconds": f"{frames / fps:.2f}" if frames else None, "seed": r.get("seed"),
                "loras": [{"name": x["name"], "strength": x["strength"]} for x in r.get("loras") or ()],
                "session_id": job.session_id, "fragment": None if fragment is None else int(fragment),
                "blocks": self.blocks(job), "attempts": job.attempts, "timings": timings,
                "error": {"code": "generation_failed", "message": job.error} if job.state is JobState.failed
                else None,
                "url": f"/v1/videos/{job.id}/content" if job.state is JobState.completed else None}

    def models(self) -> dict:
        data = []
        for name, view in self.catalog.views.items():
            spec, cfg = view.spec, view.cfg
            data.append({"id": name, "object": "model", "model_cls": spec.model_cls, "task": spec.task,
                         "sessions": spec.causvid, "sp_size": spec.sp_size, "device": spec.device,
                         "default_size": format_size(cfg.target_height, cfg.target_width),
                         "default_num_frames": cfg.target_video_length, "fps": cfg.fps, "steps": cfg.steps,
                         "replicas": len(self.dispatchers[name].replicas),
                         "queued": self.store.queue_depth(name)})
        return {"object": "list", "data": data, "loras": sorted(self.catalog.loras())}

    def health(self) -> dict:
        replicas = {n: len(d.replicas) for n, d in self.dispatchers.items()}
        running = sum(len(d.running) for d in self.dispatchers.values())
        return {"status": "ok" if all(replicas.values()) else "degraded", "models": replicas,
                "queued": self.store.queue_depth(), "running": running}

    def running_ids(self) -> list[str]:
        return [jid for d in self.dispatchers.values() for jid in d.running]


def overall_percent(kind: str, stage: str | None, step: int, total: int) -> int:
    """A job's overall progress from its current stage: the DiT steps are most of the work."""
    frac = step / total if total > 0 else 0.0
    if stage == "dit":
        return int(8 + 87 * frac) if kind == "fragment" else int(8 + 82 * frac)
    if stage == "vae":
        return 0 if kind == "fragment" else 95  # fragments decode block by block, between DiT steps
    return {"lora": 1, "restore": 2, "text": 4, "image": 6}.get(stage or "", 0)


def purge_uploads(folder: Path, older_than_s: float) -> int:
    """Uploaded images older than the job retention: their jobs are gone (or will be by then)."""
    cutoff, n = time.time() - older_than_s, 0
    for p in folder.glob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
    return n


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def _cause(e: BaseException) -> str:
    """The message of the exception a replica raised (RayTaskError wraps it)."""
    cause = getattr(e, "cause", None) or e
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
