"""Generator replica: one sequence-parallel worker group, one job at a time, events streamed back.

A replica owns a whole group because a generation holds its GPUs for seconds and those ranks must stay
together (one node) and die together: the deployment reserves `1 + sp_size` bundles (replica/deployment.py),
the replica sits in bundle 0 and its workers in bundles 1..sp (Ray fate-sharing takes them down with it).
The router makes every call (router/dispatcher.py); how jobs, cancels, retries, LoRA sets and sessions are
handled: ARCHITECTURE.md, "Generator replica". The group itself: replica/group.py; job bodies: jobs.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import ray
from ray import serve

from ..config import ModelSpec, SessionSettings
from ..loops import LoopErrors
from .group import GroupDriver
from .jobs import JobBodies, plain
from .sessions import SessionManager

log = logging.getLogger("ray.serve")

SWEEP_S = 5.0  # session TTL / idle-tier sweep


class _Job:
    """The job holding the replica: its id and whether its caller went away."""

    def __init__(self, job_id: str):
        self.id = job_id
        self.cancelled = asyncio.Event()


class Generator:
    """A Serve replica (see the module docstring). Every call accepts `route_to` (policy.PinnedRouter's
    keyword) among its `**_` and ignores it."""

    async def __init__(self, spec: dict, lora_roots: list[str], sessions: dict | None = None):
        self.spec = ModelSpec.model_validate(spec)
        self.cfg = self.spec.run_config()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id if ctx else f"local-{os.getpid()}"
        self.errors = LoopErrors()
        self.backlog = 0
        self._job: _Job | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.sessions: SessionManager | None = None
        self.driver = GroupDriver(self.spec, self.cfg, [str(r) for r in lora_roots],
                                  ray.util.get_current_placement_group(), self.errors, self._group_rebuilt)
        group = await asyncio.to_thread(self.driver.start, ())
        if self.spec.causvid:
            self.sessions = SessionManager(group, SessionSettings.model_validate(sessions or {}), errors=self.errors)
            self._spawn(self._sweeper())
        self.bodies = JobBodies(self.driver, self.sessions, self.spec, self.cfg, self.replica_id, self.errors)
        log.info("generator %s replica %s ready: %d rank(s) on %s", self.spec.name, self.replica_id,
                 self.spec.sp_size, self.spec.device)

    async def __del__(self):
        """Serve shuts the replica down: its loops stop first (their threads go with the event loop)."""
        for task in list(self._tasks):
            task.cancel()

    def _group_rebuilt(self, group) -> None:
        """The old group is gone (group None: every session cache with it) or a new one is up."""
        if self.sessions is None:
            return
        if group is None:
            gone = self.sessions.forget_all()
            if gone:
                log.info("worker group rebuilt: %d session cache(s) dropped (restored on demand)", len(gone))
        else:
            self.sessions.backend = group

    # ---- Serve hooks and status -------------------------------------------------------------------------
    async def check_health(self) -> None:
        if self.driver.fatal:
            raise RuntimeError(self.driver.fatal)
        if self._job is not None or self._lock.locked() or self.driver.group is None:
            return  # a running job repairs its group itself
        health = await asyncio.to_thread(self.driver.group.health, 5.0)
        if not health["healthy"]:
            raise RuntimeError(f"worker group unhealthy: {health['reason'] or health['ranks']}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {"busy": float(self._job is not None), "backlog": float(self.backlog)}

    async def status(self, backlog: int | None = None, **_: Any) -> dict:
        if backlog is not None:
            self.backlog = int(backlog)
        return {"replica": self.replica_id, "model": self.spec.name, "busy": self._job is not None,
                "job": self._job.id if self._job else None, "loras": [list(x) for x in self.driver.loras],
                "rebuilds": self.driver.rebuilds, "fatal": self.driver.fatal, "pid": os.getpid(),
                "runtime": self.driver.runtime,
                "sessions": self.sessions.summary() if self.sessions is not None else None,
                "loop_errors": self.errors.snapshot()}

    async def health(self, **_: Any) -> dict:
        """Every rank's health (pids, joined, broken): for operators and tests."""
        if self.driver.group is None:
            return {"healthy": False, "reason": self.driver.fatal or "restarting", "ranks": []}
        return await asyncio.to_thread(self.driver.group.health, 5.0)

    async def cancel_orphans(self, **_: Any) -> str | None:
        """A new router starts: whatever this replica runs belongs to the old one; stop it."""
        job = self._job
        if job is None:
            return None
        job.cancelled.set()
        await self.driver.cancel(job.id)
        return job.id

    # ---- jobs ----------------------------------------------------------------------------------------
    async def generate(self, job: dict, **_: Any) -> AsyncIterator[dict]:
        """A video job (T2V / I2V; CausVid models: `num_fragments` fragments of a throw-away session)."""
        body = self.bodies.causvid_video if self.spec.causvid else self.bodies.video
        async for ev in self._exclusive(job["job_id"], body, job):
            yield ev

    async def fragment(self, job: dict, **_: Any) -> AsyncIterator[dict]:
        """The next fragment of a CausVid session (job: session_id, prompt, open, state)."""
        self._need_sessions()
        async for ev in self._exclusive(job["job_id"], self.bodies.fragment, job):
            yield ev

    async def _exclusive(self, job_id: str, body: Callable[..., Awaitable[None]], job: dict) -> AsyncIterator[dict]:
        """Run `body(job, emit, polled)` alone on the group, in a task of the replica's own (so the caller's
        cancellation cannot cut it short), relaying its events to the caller."""
        queue: asyncio.Queue = asyncio.Queue()
        end = object()
        me = _Job(job_id)

        def polled(fn):
            return self.driver.polled(fn, me.id, me.cancelled, queue.put_nowait)

        async def runner():
            try:
                async with self._lock:
                    if me.cancelled.is_set():
                        queue.put_nowait({"type": "cancelled"})
                        return
                    self._job = me
                    try:
                        if self.driver.group is None:
                            await self.driver.rebuild()
                        queue.put_nowait({"type": "started", "replica": self.replica_id, "at": time.time()})
                        await body(job, queue.put_nowait, polled)
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
                await self.driver.cancel(job_id)
            me.cancelled.set()

    # ---- CausVid sessions (the router's calls) ----------------------------------------------------------
    def _need_sessions(self) -> None:
        if self.sessions is None:
            raise ValueError(f"model {self.spec.name} ({self.spec.model_cls}) has no sessions: they need a model "
                             "class that generates block by block (GET /v1/models: sessions = true)")

    async def open_session(self, session_id: str, prompt: str, seed: int | None = None, height: int | None = None,
                           width: int | None = None, **_: Any) -> dict:
        """Open a session here (under the job lock: opening runs the text encoder on the ranks)."""
        self._need_sessions()
        async with self._lock:
            if self.driver.group is None:
                await self.driver.rebuild()
            info = await asyncio.to_thread(self.sessions.open, session_id, prompt, seed, height, width)
            state = await asyncio.to_thread(self.driver.group.session_state, session_id)
        return {"replica": self.replica_id, "info": plain(info), "state": state}

    async def session_info(self, session_id: str, **_: Any) -> dict | None:
        """What the workers hold for a session (None if not here). Answers while a job runs."""
        self._need_sessions()
        if session_id not in self.sessions or self.driver.group is None:
            return None
        try:
            info = await asyncio.to_thread(self.driver.group.session_info, session_id)
        except KeyError:
            return None
        return {"replica": self.replica_id, **plain(info), "tier": self.sessions.tier(session_id)}

    async def close_session(self, session_id: str, **_: Any) -> bool:
        self._need_sessions()
        async with self._lock:
            if self.driver.group is None:
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
        return await asyncio.to_thread(self.driver.group.session_stats)

    async def _sweeper(self, period_s: float = SWEEP_S) -> None:
        """The session TTL / idle-tier sweep; SessionManager.sweep handles each session in its own try."""
        while True:
            await asyncio.sleep(period_s)
            if self._lock.locked() or self.driver.group is None:
                continue
            async with self._lock:
                try:
                    await asyncio.to_thread(self.sessions.sweep)
                except Exception as e:  # the sweep could not even list its sessions: try again next period
                    self.errors.record("session_sweep", self.replica_id, e)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
