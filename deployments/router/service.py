"""Everything the router does, minus HTTP: the composition of its stores, catalog, job and session services,
dispatchers and housekeeping, and the answers about the service as a whole (health, readiness, models).

One instance per router replica (there is one: it owns the SQLite job store). `start()` recovers the jobs a
dead router left running (requeued, or failed after `max_attempts` tries), tells every generator to drop
work that router had started, then runs one dispatcher per model and the housekeeping loop.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from model.config import format_size

from ..config import AppArgs
from ..loops import LoopErrors
from ..storage.jobs import JobStore
from ..storage.sessions import SessionStore
from .catalog import Catalog
from .dispatcher import ModelDispatcher
from .housekeeping import Housekeeping
from .jobs import JobService
from .metrics import Metrics
from .sessions import SessionService

log = logging.getLogger("ray.serve")


class Service:
    def __init__(self, args: AppArgs, handles: dict[str, Any]):
        self.args = args
        state = Path(args.state_dir)
        self.store = JobStore(state / "jobs.sqlite", state / "results", retention_s=args.retention_s)
        self.session_store = SessionStore(state)
        self.catalog = Catalog(args)
        self.metrics = Metrics()
        self.errors = LoopErrors()
        self.handles = handles
        self.jobs = JobService(args, self.store, self.catalog, self.metrics, self.errors)
        self.dispatchers = {name: ModelDispatcher(name, h, self.store, self.jobs, self.errors)
                            for name, h in handles.items()}
        self.jobs.dispatchers = self.dispatchers
        self.sessions = SessionService(args, self.session_store, self.catalog, self.jobs, handles, self.dispatchers)
        self.jobs.sessions = self.sessions
        self.housekeeping = Housekeeping(args, self.store, self.session_store, self.sessions.end, self.errors)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        n = await asyncio.to_thread(self.store.recover, self.args.max_attempts)
        if n:
            log.info("router: %d job(s) were running when the previous router stopped; requeued or failed", n)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._start_dispatch()))
        self._tasks.append(loop.create_task(self.housekeeping.run()))

    async def _start_dispatch(self) -> None:
        await asyncio.gather(*(d.stop_orphans() for d in self.dispatchers.values()))
        for d in self.dispatchers.values():
            d.start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for d in self.dispatchers.values():
            await d.stop()

    # ---- the service as a whole ----------------------------------------------------------------------
    async def models(self) -> dict:
        queued = await asyncio.to_thread(lambda: {n: self.store.queue_depth(n) for n in self.catalog.views})
        data = []
        for name, view in self.catalog.views.items():
            spec, cfg = view.spec, view.cfg
            data.append({"id": name, "object": "model", "model_cls": spec.model_cls, "task": spec.task,
                         "sessions": spec.causvid, "sp_size": spec.sp_size, "device": spec.device,
                         "default_size": format_size(cfg.target_height, cfg.target_width),
                         "default_num_frames": cfg.target_video_length, "fps": cfg.fps, "steps": cfg.steps,
                         "replicas": len(self.dispatchers[name].replicas), "queued": queued[name],
                         "attention": cfg.kernel_names, "runtime": replica_runtimes(self.dispatchers[name]),
                         "decoders": ["full", "tiny"] if cfg.tae_path else ["full"],
                         "decoder": "tiny" if cfg.use_tae else "full"})
        return {"object": "list", "data": data, "loras": sorted(await asyncio.to_thread(self.catalog.loras))}

    async def health(self) -> dict:
        """Liveness and what an operator wants at a glance; `ready` says whether every model has a replica."""
        replicas = {n: len(d.replicas) for n, d in self.dispatchers.items()}
        running = sum(len(d.running) for d in self.dispatchers.values())
        ready = all(replicas.values())
        return {"status": "ok" if ready else "degraded", "ready": ready, "models": replicas,
                "queued": await asyncio.to_thread(self.store.queue_depth), "running": running,
                "loop_errors": self.errors.snapshot(),
                "runtime": {n: replica_runtimes(d) for n, d in self.dispatchers.items()}}

    async def waiting_for_replicas(self) -> list[str]:
        """Models without a running replica (a request for them would 503); those are polled again now, so
        readiness turns the moment the last replica is up, not at the dispatchers' next idle poll."""
        waiting = [n for n, d in self.dispatchers.items() if not d.replicas]
        await asyncio.gather(*(self.dispatchers[n].poll(force=True) for n in waiting))
        return [n for n in waiting if not self.dispatchers[n].replicas]


def replica_runtimes(dispatcher) -> dict[str, dict]:
    """{replica: what it runs} (engine.rank.runtime_info, as of the dispatcher's last status poll)."""
    return {rid: st["runtime"] for rid, st in dispatcher.replicas.items() if st.get("runtime")}
