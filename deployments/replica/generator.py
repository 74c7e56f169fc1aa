"""Generator replica: one sequence-parallel worker group, one job at a time, events streamed back.

Why a replica owns a whole group: a Wan2.1 14B generation holds 8 GPUs for seconds, and those ranks
must stay together (one NVLink node) and die together. The deployment reserves `1 + sp_size` bundles
(STRICT_PACK); the replica actor sits in bundle 0 and starts its `SPWorkerGroup` with rank r pinned to
bundle 1 + r. When the replica goes, its worker actors go with it (Ray fate-sharing).

Calls (all made by the router, see deployments/dispatch.py):
- `generate(job)` / `fragment(job)` stream events: `started`, `progress` (stage, step i of n), `retry`,
  `block` (CausVid: each decoded block as mp4 bytes), then one of `result` (the mp4 bytes and timings:
  GPU pods need no shared volume, the router writes results), `error` (with `kind`: request = the input
  cannot be generated, failure = the replica failed, missing = this replica does not hold the session),
  or `cancelled`.
- Cancel: the router cancels the streaming call (`response.cancel()`), which reaches exactly the replica
  that runs the job, also with many replicas; the replica then asks rank 0 to stop after its current
  step and keeps the job lock until the group is idle again, so the next job never meets a busy group.
- Worker death mid-job: the group raises RankFailure (or Ray reports the actor dead); the replica
  rebuilds its group in the same bundles and runs the job once more; a second failure fails the job
  with both reasons. If the rebuild itself fails, `check_health` raises and Serve replaces the replica.
- `check_health` asks every rank (pid, joined, broken) while no job runs (a running job notices a dead
  rank itself and repairs it) and raises with the reason when the group is unhealthy.
- `status(backlog)`: busy or not, the LoRA set loaded, the sessions held; the router polls it (a
  broadcast to every replica) and passes the queue length back for autoscaling.

LoRAs are merged into the weights at load (model/lora.py: a merge cannot be undone), so a job asking
for another LoRA set makes the replica reload its group with that set; the router prefers replicas that
already hold a job's set.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import ray
from ray import serve

from ..config import ModelSpec, SessionSettings
from ..policy import ROUTE_KWARG
from .sessions import SessionManager

log = logging.getLogger("ray.serve")

POLL_S = 0.25  # progress polling while a job runs (each poll is an actor call that competes with the job)
SWEEP_S = 5.0  # session TTL / idle-tier sweep


def mp4_bytes(frames, fps: int) -> bytes:
    """Frames ([3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3]) -> mp4 file contents."""
    from model.video import write_mp4

    with tempfile.TemporaryDirectory(prefix="wanserve-") as tmp:
        path = write_mp4(Path(tmp) / "v.mp4", frames, fps=fps)
        return path.read_bytes()


def _worker_failures() -> tuple[type[BaseException], ...]:
    from parallel.group import RankFailure

    return RankFailure, ray.exceptions.RayActorError, TimeoutError


class _Job:
    """The job holding the replica: its id and whether its caller went away."""

    def __init__(self, job_id: str):
        self.id = job_id
        self.cancelled = asyncio.Event()


class Generator:
    """A Serve replica: one SPWorkerGroup (see the module docstring)."""

    async def __init__(self, spec: dict, lora_roots: list[str], sessions: dict | None = None):
        self.spec = ModelSpec.model_validate(spec)
        self.cfg = self.spec.run_config()
        self.lora_roots = [str(r) for r in lora_roots]
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id if ctx else f"local-{os.getpid()}"
        self.pg = ray.util.get_current_placement_group()
        self.loras: tuple = ()
        self.fatal: str | None = None  # set when the group could not be rebuilt: check_health raises it
        self.rebuilds = 0
        self.backlog = 0
        self._job: _Job | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.group = await asyncio.to_thread(self._start_group, ())
        self.sessions = (SessionManager(self.group, SessionSettings.model_validate(sessions or {}))
                         if self.spec.causvid else None)
        if self.sessions is not None:
            self._spawn(self._sweeper())
        log.info("generator %s replica %s ready: %d rank(s) on %s", self.spec.name, self.replica_id,
                 self.spec.sp_size, self.spec.device)

    # ---- the worker group ---------------------------------------------------------------------------
    def _start_group(self, loras: tuple):
        from model.config import load_run_config
        from engine.worker_group import SPWorkerGroup

        cfg = self.cfg
        if loras:
            cfg = load_run_config({**cfg.model_dump(mode="json"),
                                   "lora_configs": [{"path": p, "strength": s} for p, s in loras]})
        bundles = list(range(1, self.spec.sp_size + 1)) if self.pg is not None else None
        group = SPWorkerGroup(self.spec.model_path, cfg, placement_group=self.pg, bundle_indices=bundles,
                              num_cpus=self.spec.rank_cpus, num_gpus=1 if self.spec.device == "cuda" else 0,
                              device=self.spec.device, num_threads=self.spec.num_threads,
                              lora_roots=self.lora_roots or None, start_timeout=self.spec.start_timeout_s)
        self.loras = loras
        return group

    async def _rebuild(self, loras: tuple | None = None) -> None:
        """Shut the group down and start a new one in the same bundles (the old ranks' caches are gone)."""
        old, self.group = self.group, None
        if old is not None:
            await asyncio.to_thread(old.shutdown, 10.0)
        if self.sessions is not None:
            gone = self.sessions.forget_all()
            if gone:
                log.info("worker group rebuilt: %d session cache(s) dropped (restored on demand)", len(gone))
        try:
            self.group = await asyncio.to_thread(self._start_group, self.loras if loras is None else loras)
        except Exception as e:
            self.fatal = f"the worker group could not be restarted: {type(e).__name__}: {e}"
            raise
        self.rebuilds += 1
        if self.sessions is not None:
            self.sessions.backend = self.group

    # ---- Serve hooks -----------------------------------------------------------------------------------
    async def check_health(self) -> None:
        if self.fatal:
            raise RuntimeError(self.fatal)
        if self._job is not None or self._lock.locked() or self.group is None:
            return  # a running job repairs its group itself
        health = await asyncio.to_thread(self.group.health, 5.0)
        if not health["healthy"]:
            raise RuntimeError(f"worker group unhealthy: {health['reason'] or health['ranks']}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {"busy": float(self._job is not None), "backlog": float(self.backlog)}

    async def status(self, backlog: int | None = None, **_: Any) -> dict:
        if backlog is not None:
            self.backlog = int(backlog)
        return {"replica": self.replica_id, "model": self.spec.name, "busy": self._job is not None,
                "job": self._job.id if self._job else None, "loras": [list(x) for x in self.loras],
                "rebuilds": self.rebuilds, "fatal": self.fatal, "pid": os.getpid(),
                "sessions": self.sessions.summary() if self.sessions is not None else None}

    async def health(self, **_: Any) -> dict:
        """Every rank's health (pids, joined, broken): for operators and tests."""
        if self.group is None:
            return {"healthy": False, "reason": self.fatal or "restarting", "ranks": []}
        return await asyncio.to_thread(self.group.health, 5.0)

    async def cancel_orphans(self, **_: Any) -> str | None:
        """A new router starts: whatever this replica runs belongs to the old one; stop it."""
        job = self._job
        if job is not None:
            job.cancelled.set()
            await asyncio.to_thread(self.group.cancel)
            return job.id
        return None

    # ---- jobs --------------------------------------------------------------------------------------
    async def generate(self, job: dict, **_: Any) -> AsyncIterator[dict]:
        """A video job (T2V / I2V; CausVid models: `num_fragments` fragments of a throw-away session)."""
        body = self._causvid_video if self.spec.causvid else self._video
        async for ev in self._exclusive(job["job_id"], body, job):
            yield ev

    async def fragment(self, job: dict, **_: Any) -> AsyncIterator[dict]:
        """The next fragment of a CausVid session (job: session_id, prompt, open, state)."""
        self._need_sessions()
        async for ev in self._exclusive(job["job_id"], self._fragment, job):
            yield ev

    async def _exclusive(self, job_id: str, body: Callable[..., Awaitable[None]], job: dict) -> AsyncIterator[dict]:
        """Run `body(job, emit, run)` alone on the group, in a task of the replica's own (so the caller's
        cancellation cannot cut it short), relaying its events to the caller."""
        queue: asyncio.Queue = asyncio.Queue()
        end = object()
        me = _Job(job_id)

        async def runner():
            try:
                async with self._lock:
                    if me.cancelled.is_set():
                        queue.put_nowait({"type": "cancelled"})
                        return
                    self._job = me
                    try:
                        if self.group is None:
                            await self._rebuild()
                        queue.put_nowait({"type": "started", "replica": self.replica_id, "at": time.time()})
                        await body(job, queue.put_nowait, lambda fn: self._polled(fn, me, queue.put_nowait))
                    except Exception as e:  # a bug or an unexpected failure: the job fails with it
                        log.exception("job %s failed", job_id)
                        queue.put_nowait({"type": "error", "kind": "failure", "message": f"{type(e).__name__}: {e}"})
                    finally:
                        self._job = None
            finally:
                queue.put_nowait(end)

        self._spawn(runner())
        try:
            while (ev := await queue.get()) is not end:
                yield ev
        finally:  # the caller cancelled (or went away) before the end: stop the job
            if not me.cancelled.is_set() and self._job is me:
                me.cancelled.set()
                if self.group is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.group.cancel)
            me.cancelled.set()

    async def _polled(self, fn: Callable[[], Any], job: _Job, emit) -> Any:
        """Run a blocking group call in a thread, emitting progress while it runs and passing a cancel on."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        last, cancel_sent = None, False
        while not fut.done():
            await asyncio.wait({fut}, timeout=POLL_S)
            if job.cancelled.is_set() and not cancel_sent:
                cancel_sent = True
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.group.cancel)
            with contextlib.suppress(Exception):
                p = await asyncio.to_thread(self.group.progress, 2.0)
                if p and p != last:
                    last = p
                    emit({"type": "progress", **p})
        return fut.result()

    async def _with_retry(self, call: Callable[[], Awaitable[Any]], emit) -> Any:
        """`call()` with one retry on a fresh group if a rank dies. Raises what the retry raised."""
        try:
            return await call()
        except _worker_failures() as first:
            reason = f"{type(first).__name__}: {first}"
            log.warning("worker group failed (%s); rebuilding and retrying once", reason)
            emit({"type": "retry", "reason": reason})
            await self._rebuild()
            try:
                return await call()
            except _worker_failures() as second:
                raise _GroupFailed(f"the worker group failed twice: first {reason}; then "
                                   f"{type(second).__name__}: {second}") from second

    async def _run_guarded(self, emit, call: Callable[[], Awaitable[Any]]) -> Any | None:
        """Map a job's outcome to events: request errors, cancellation, group failures. None = ended."""
        from model.pipeline import Cancelled, RequestError

        try:
            return await self._with_retry(call, emit)
        except RequestError as e:
            emit({"type": "error", "kind": "request", "message": str(e)})
        except Cancelled:
            emit({"type": "cancelled"})
        except _GroupFailed as e:
            emit({"type": "error", "kind": "failure", "message": str(e)})
        except _worker_failures() as e:  # the rebuild failed; check_health reports it
            emit({"type": "error", "kind": "failure", "message": f"{type(e).__name__}: {e}"})
        return None

    async def _video(self, job: dict, emit, polled) -> None:
        from model.pipeline import Request

        t0 = time.perf_counter()
        loras = tuple((x["path"], float(x["strength"])) for x in job.get("loras") or ())
        timings: dict[str, float] = {}
        if loras != self.loras:
            t = time.perf_counter()
            emit({"type": "progress", "stage": "lora", "step": 0, "total": 1})
            previous = self.loras
            try:
                await self._rebuild(loras)
            except Exception as e:  # a LoRA that does not fit the model: the request's fault, not the replica's
                self.fatal = None
                await self._rebuild(previous)  # if this fails too, fatal stays set and Serve replaces us
                names = [Path(p).name for p, _ in loras]
                emit({"type": "error", "kind": "request", "message": f"LoRAs {names} could not be loaded on this "
                      f"model: {_last_line(e)}"})
                return
            timings["lora_reload"] = time.perf_counter() - t
        request = Request(job["prompt"], job.get("negative_prompt"), job.get("image"), job.get("seed"),
                          job.get("num_frames"), job.get("height"), job.get("width"))
        gen = await self._run_guarded(emit, lambda: polled(lambda: self.group.run(request, self.spec.job_timeout_s)))
        if gen is None:
            return
        t = time.perf_counter()
        video = await asyncio.to_thread(mp4_bytes, gen.video, gen.fps)
        timings.update({k: float(v) for k, v in gen.timings.items()})
        timings["mp4"] = time.perf_counter() - t
        timings["replica_total"] = time.perf_counter() - t0
        _, frames, height, width = gen.video.shape
        emit({"type": "result", "video": video, "frames": int(frames), "height": int(height), "width": int(width),
              "seed": int(gen.seed), "timings": timings})

    # ---- CausVid sessions --------------------------------------------------------------------------
    def _need_sessions(self) -> None:
        if self.sessions is None:
            raise ValueError(f"model {self.spec.name} ({self.spec.model_cls}) has no sessions: only wan2.1_causvid")

    async def _session_ready(self, job: dict, emit) -> bool:
        """Make sure the session is open here: open it (first fragment), restore it from the router's
        state, or answer `missing` so the router resends with the state."""
        sid, mgr = job["session_id"], self.sessions
        if sid in mgr:
            await asyncio.to_thread(mgr.ready, sid)
            return True
        if job.get("state") is not None:
            emit({"type": "progress", "stage": "restore", "step": 0, "total": 1})
            await asyncio.to_thread(mgr.restore, sid, job["state"])
        elif job.get("open") is not None:
            o = job["open"]
            await asyncio.to_thread(mgr.open, sid, o["prompt"], o.get("seed"), o.get("height"), o.get("width"))
        else:
            emit({"type": "error", "kind": "missing", "message": f"session {sid} is not held by this replica"})
            return False
        await asyncio.to_thread(mgr.ready, sid)
        return True

    async def _fragment(self, job: dict, emit, polled) -> None:
        sid = job["session_id"]
        t0 = time.perf_counter()
        fps = self.cfg.fps

        async def one_fragment():
            if not await self._session_ready(job, emit):
                return None
            group = self.group
            # Blocks are counted from the session's size before the call: fragment_blocks(since) is relative to
            # the running call, and until the call has started it would still describe the previous one.
            before = (await asyncio.to_thread(group.session_info, sid))["blocks"]
            sent = [0]

            async def forward_blocks():
                done = (await asyncio.to_thread(group.session_info, sid))["blocks"] - before
                if done <= sent[0]:
                    return
                for frames in await asyncio.to_thread(group.fragment_blocks, sid, sent[0]):
                    data = await asyncio.to_thread(mp4_bytes, frames, fps)
                    emit({"type": "block", "index": sent[0], "video": data, "frames": int(len(frames))})
                    sent[0] += 1

            fut = asyncio.ensure_future(polled(lambda: group.next_fragment(sid, job.get("prompt"),
                                                                           self.spec.job_timeout_s)))
            while not fut.done():
                await asyncio.wait({fut}, timeout=POLL_S)
                with contextlib.suppress(Exception):
                    await forward_blocks()
            out = fut.result()
            with contextlib.suppress(Exception):
                await forward_blocks()
            return out

        out = await self._run_guarded(emit, one_fragment)
        if out is None:
            return
        t = time.perf_counter()
        video = await asyncio.to_thread(mp4_bytes, out["frames"], fps)
        info = await asyncio.to_thread(self.sessions.used, sid)
        state = await asyncio.to_thread(self.group.session_state, sid)
        timings = {k: float(v) for k, v in (out.get("timings") or {}).items()}
        timings["mp4"] = time.perf_counter() - t
        timings["replica_total"] = time.perf_counter() - t0
        frames = out["frames"]
        emit({"type": "result", "video": video, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
              "width": int(frames.shape[2]), "fragment": int(out.get("fragment", 0)), "timings": timings,
              "info": _plain(info), "state": state, "replica": self.replica_id})

    async def _causvid_video(self, job: dict, emit, polled) -> None:
        """LightX2V's one call: a session of `num_fragments` fragments, its whole video, then closed."""
        sid = f"job-{job['job_id']}"
        n = int(job.get("num_fragments") or 1)
        t0 = time.perf_counter()
        try:
            async def run_all():
                if sid not in self.sessions:
                    await asyncio.to_thread(self.sessions.open, sid, job["prompt"], job.get("seed"),
                                            job.get("height"), job.get("width"))
                await asyncio.to_thread(self.sessions.ready, sid)
                done = (await asyncio.to_thread(self.group.session_info, sid)).get("fragments", 0)
                for _ in range(done, n):
                    await polled(lambda: self.group.next_fragment(sid, None, self.spec.job_timeout_s))
                return await asyncio.to_thread(self.group.session_video, sid)

            frames = await self._run_guarded(emit, run_all)
            if frames is None:
                return
            video = await asyncio.to_thread(mp4_bytes, frames, self.cfg.fps)
            emit({"type": "result", "video": video, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                  "width": int(frames.shape[2]), "seed": job.get("seed"),
                  "timings": {"replica_total": time.perf_counter() - t0, "fragments": float(n)}})
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.sessions.close, sid)

    async def open_session(self, session_id: str, prompt: str, seed: int | None = None, height: int | None = None,
                           width: int | None = None, **_: Any) -> dict:
        """Open a session here (under the job lock: opening runs the text encoder on the ranks)."""
        self._need_sessions()
        async with self._lock:
            if self.group is None:
                await self._rebuild()
            info = await asyncio.to_thread(self.sessions.open, session_id, prompt, seed, height, width)
            state = await asyncio.to_thread(self.group.session_state, session_id)
        return {"replica": self.replica_id, "info": _plain(info), "state": state}

    async def session_info(self, session_id: str, **_: Any) -> dict | None:
        """What the workers hold for a session (None if not here). Answers while a job runs."""
        self._need_sessions()
        if session_id not in self.sessions or self.group is None:
            return None
        try:
            info = await asyncio.to_thread(self.group.session_info, session_id)
        except KeyError:
            return None
        return {"replica": self.replica_id, **_plain(info), "tier": self.sessions.tier(session_id)}

    async def session_video(self, session_id: str, state: dict | None = None, **_: Any) -> dict:
        """The whole video so far as mp4 bytes; restores the session first if it is not here and a state
        is given. {"missing": True} if neither."""
        self._need_sessions()
        async with self._lock:
            if self.group is None:
                await self._rebuild()
            if session_id not in self.sessions:
                if state is None:
                    return {"missing": True}
                await asyncio.to_thread(self.sessions.restore, session_id, state)
            frames = await asyncio.to_thread(self.group.session_video, session_id)
        if len(frames) == 0:
            return {"video": None, "frames": 0}
        data = await asyncio.to_thread(mp4_bytes, frames, self.cfg.fps)
        return {"video": data, "frames": int(frames.shape[0]), "replica": self.replica_id}

    async def close_session(self, session_id: str, **_: Any) -> bool:
        self._need_sessions()
        async with self._lock:
            if self.group is None:
                return False
            return await asyncio.to_thread(self.sessions.close, session_id)

    async def offload_session(self, session_id: str, **_: Any) -> bool:
        """Move a session to the CPU tier now (operators; the sweep does it after idle_after_s)."""
        self._need_sessions()
        async with self._lock:
            if session_id not in self.sessions:
                return False
            await asyncio.to_thread(self.sessions.offload, session_id)
            return True

    async def session_stats(self, **_: Any) -> list[dict]:
        """Per rank: sessions, active / idle cache bytes, session objects still alive (leak check)."""
        self._need_sessions()
        return await asyncio.to_thread(self.group.session_stats)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            if self._lock.locked() or self.group is None:
                continue
            async with self._lock:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.sessions.sweep)

    # ---- plumbing ----------------------------------------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _GroupFailed(RuntimeError):
    """The group failed, was rebuilt, and failed again."""


def _last_line(e: BaseException) -> str:
    """The root cause of a worker's failure: the last line of its message that names an error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln.split(":")[0]]
    return (named or lines or [type(e).__name__])[-1][:500]


def _plain(info: dict) -> dict:
    """Session info as JSON-friendly values."""
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = _plain(v)
        else:
            out[k] = str(v)
    return out


def generator_deployment(spec: ModelSpec):
    """The Serve deployment of one model (options from its ModelSpec)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    opts: dict[str, Any] = dict(
        name=spec.deployment_name,
        ray_actor_options={"num_cpus": spec.replica_cpus},
        placement_group_bundles=spec.bundles(),
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=spec.max_ongoing_requests,
        health_check_period_s=spec.health_check_period_s,
        health_check_timeout_s=spec.health_check_timeout_s,
        graceful_shutdown_timeout_s=30,
        request_router_config=RequestRouterConfig(request_router_class="deployments.policy:PinnedRouter",
                                                  request_routing_stats_period_s=5),
    )
    if spec.autoscaling is not None:
        a = spec.autoscaling
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=a.min_replicas, max_replicas=a.max_replicas, initial_replicas=a.min_replicas,
            target_ongoing_requests=a.target_ongoing_requests, upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
            policy={"policy_function": "deployments.policy:backlog_policy"})
        opts["num_replicas"] = "auto"
    else:
        opts["num_replicas"] = spec.num_replicas
    assert ROUTE_KWARG == "route_to"  # every call above accepts it (as **_) and ignores it
    return serve.deployment(Generator).options(**opts)
