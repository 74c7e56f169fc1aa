"""Per-model dispatcher: the oldest queued job goes to an idle replica, and its events come back.

The router picks the replica (Serve's request router only carries the choice out, deployments/policy.py):
the durable queue lives here, and only the router knows which replicas it gave work and which one holds
each CausVid session. A job is claimed only when a replica is idle, so no job waits inside Serve where a
router restart would lose track of it. The loop, the choice of replica and the outcomes: ARCHITECTURE.md,
"Dispatch".
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError, RequestCancelledError

from ..loops import LoopErrors
from ..storage.jobs import Job, JobStore

log = logging.getLogger("ray.serve")

POLL_S = 1.0  # replica status refresh while there is work
IDLE_POLL_S = 5.0  # ... and while there is none
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ReplicaUnavailableError,
                DeploymentUnavailableError)


class SessionLost(Exception):
    """A session's cache is gone and so is its stored state: it cannot continue (410)."""


class DispatchHost(Protocol):
    """What a dispatcher needs from the job service (router/jobs.py implements it)."""

    async def payload(self, job: Job, with_state: bool) -> dict: ...
    async def on_event(self, job: Job, ev: dict) -> None: ...
    async def finish(self, job: Job, attempt: int, outcome: dict | None) -> None: ...
    async def session_owner(self, session_id: str | None) -> str | None: ...
    def replica_died(self, model: str) -> None: ...
    def depth(self, model: str, queued: int, running: int) -> None: ...
    def runtime(self, model: str, replicas: dict[str, dict]) -> None: ...


@dataclass
class Running:
    job: Job
    replica: str
    response: Any = None
    started: float = field(default_factory=time.time)


class ModelDispatcher:
    def __init__(self, name: str, handle, store: JobStore, host: DispatchHost, errors: LoopErrors):
        self.name, self.handle, self.store, self.host, self.errors = name, handle, store, host, errors
        self.replicas: dict[str, dict] = {}
        self.polled_at = 0.0
        self.assigned: dict[str, str] = {}  # replica -> job id (dispatched by this router, not yet ended)
        self.running: dict[str, Running] = {}
        self.wake = asyncio.Event()
        self.durations: list[float] = []  # recent job run times, for Retry-After
        self._task: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for t in [self._task, *self._jobs]:
            if t is not None:
                t.cancel()

    async def stop_orphans(self) -> list[str]:
        """A new router starts: every replica stops what it runs for the old one (its result would have no one
        to go to). One answer per replica; a replica that fails to answer is logged and counted."""
        try:
            answers = await self.handle.broadcast("cancel_orphans").results_async(timeout_s=10, return_exceptions=True)
        except DeploymentUnavailableError:  # no replica up yet (the first start): nothing runs there to stop
            log.debug("cancel_orphans: %s has no replica yet", self.name)
            return []
        except Exception as e:  # the controller did not answer: the replicas' jobs may still run; say so
            self.errors.record("cancel_orphans", self.name, e)
            return []
        stopped = []
        for answer in answers:
            if isinstance(answer, BaseException):
                self.errors.record("cancel_orphans", f"a replica of {self.name}", answer)
            elif isinstance(answer, str):
                stopped.append(answer)
        if stopped:
            log.info("router: %s stopped %d orphaned job(s): %s", self.name, len(stopped), stopped)
        return stopped

    # ---- replicas --------------------------------------------------------------------------------------
    async def poll(self, force: bool = False) -> dict[str, dict]:
        """Refresh the replica table with a status broadcast (passes the backlog for autoscaling)."""
        if not force and time.monotonic() - self.polled_at < POLL_S:
            return self.replicas
        backlog = await asyncio.to_thread(self.store.queue_depth, self.name)
        try:
            results = await self.handle.broadcast("status", backlog=backlog).results_async(
                timeout_s=10, return_exceptions=True)
        except Exception as e:  # no replica up yet, controller busy: try again next round
            log.debug("status broadcast to %s failed: %s", self.name, e)
            return self.replicas
        self.replicas = {r["replica"]: r for r in results if isinstance(r, dict) and "replica" in r}
        self.polled_at = time.monotonic()
        self.host.runtime(self.name, self.replicas)
        return self.replicas

    def idle(self) -> list[str]:
        return [rid for rid, st in self.replicas.items()
                if rid not in self.assigned and not st.get("busy") and not st.get("fatal")]

    def alive(self, replica: str | None) -> bool:
        return replica is not None and replica in self.replicas

    def mean_duration(self) -> float | None:
        return sum(self.durations) / len(self.durations) if self.durations else None

    def pick(self, candidates: list[str], loras: list | None = None) -> str:
        """Among candidates: those already holding the LoRA set, then the fewest sessions."""
        same = [r for r in candidates if self.replicas.get(r, {}).get("loras", []) == (loras or [])]

        def sessions(r: str) -> int:
            return (self.replicas.get(r, {}).get("sessions") or {}).get("sessions", 0)

        return min(same or candidates, key=sessions)

    # ---- the loop ---------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=POLL_S)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors.record("dispatch", self.name, e)
                await asyncio.sleep(POLL_S)

    async def dispatch(self) -> None:
        queued = await asyncio.to_thread(self.store.queue_depth, self.name)
        self.host.depth(self.name, queued, len(self.running))
        if queued == 0:
            if time.monotonic() - self.polled_at > IDLE_POLL_S:
                await self.poll(force=True)
            return
        await self.poll()
        while idle := self.idle():
            busy_sessions = {r.job.session_id for r in self.running.values() if r.job.session_id}
            for sid in await asyncio.to_thread(self.store.queued_sessions, self.name):
                owner = await self.host.session_owner(sid)
                if sid not in busy_sessions and self.alive(owner) and owner not in idle:
                    busy_sessions.add(sid)  # its replica is busy: wait for it rather than rebuild elsewhere
            job = await asyncio.to_thread(self.store.claim_next, [self.name], busy_sessions)
            if job is None:
                return
            replica = await self.choose(job, idle)
            self.assigned[replica] = job.id
            self.replicas[replica]["busy"] = True
            self.running[job.id] = Running(job, replica)
            task = asyncio.get_running_loop().create_task(self._run(job, replica))
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def choose(self, job: Job, idle: list[str]) -> str:
        if job.session_id:
            owner = await self.host.session_owner(job.session_id)
            if owner in idle:
                return owner
        return self.pick(idle, [[x["path"], float(x["strength"])] for x in job.request.get("loras") or ()])

    # ---- one job ------------------------------------------------------------------------------------------
    async def _run(self, job: Job, replica: str) -> None:
        attempt, t0 = job.attempts, time.time()
        outcome: dict | None = None
        try:
            owner = await self.host.session_owner(job.session_id) if job.session_id else None
            payload = await self.host.payload(job, with_state=bool(job.session_id) and not self.alive(owner))
            outcome = await self._stream(job, replica, payload)
            if outcome and outcome.get("kind") == "missing" and job.session_id:
                outcome = await self._stream(job, replica, await self.host.payload(job, with_state=True))
        except SessionLost as e:
            outcome = {"type": "error", "kind": "lost", "message": str(e)}
        except Exception as e:
            log.exception("job %s: dispatch failed", job.id)
            outcome = {"type": "error", "kind": "failure", "message": f"{type(e).__name__}: {e}"}
        finally:
            self.running.pop(job.id, None)
            if self.assigned.get(replica) == job.id:
                del self.assigned[replica]
                if replica in self.replicas:  # free now: do not wait for the next status poll to say so
                    self.replicas[replica]["busy"] = False
            self.wake.set()
        self.durations = (self.durations + [time.time() - t0])[-20:]
        await self.host.finish(job, attempt, outcome)

    async def _stream(self, job: Job, replica: str, payload: dict) -> dict | None:
        """Call the replica and relay its events; returns the last (terminal) event, or one describing
        how the call broke."""
        method = "fragment" if job.kind == "fragment" else "generate"
        response = self.handle.options(stream=True, method_name=method).remote(payload, route_to=replica)
        run = self.running.get(job.id)
        if run is not None:
            run.response = response
            if (await asyncio.to_thread(self.store.get, job.id)).cancel_requested:
                response.cancel()  # cancelled between claim and call
        outcome = None
        try:
            async for ev in response:
                if ev.get("type") in ("result", "error", "cancelled"):
                    outcome = ev
                else:
                    await self.host.on_event(job, ev)
        except RequestCancelledError:
            return {"type": "cancelled"}
        except REPLICA_GONE as e:
            self.replicas.pop(replica, None)
            self.host.replica_died(self.name)
            return {"type": "error", "kind": "replica_died",
                    "message": f"generator replica {replica} died during the job ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300]})"}
        if outcome is None:
            return {"type": "error", "kind": "replica_died", "message": f"replica {replica} ended the job without "
                                                                        "a result"}
        return outcome

    def cancel(self, job_id: str) -> bool:
        """Cancel the streaming call of a running job; it reaches exactly the replica that runs it."""
        run = self.running.get(job_id)
        if run is None or run.response is None:
            return False
        run.response.cancel()
        return True
