"""The replica's worker group: started in the replica's bundles, rebuilt after a rank dies or for another
LoRA set, a job retried once on a fresh group, and progress polled (and a cancel passed on) while a blocking
group call runs. When the rebuild itself fails, `fatal` is set and the replica's health check reports it."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import ray

from parallel.group import RankFailure

from ..config import ModelSpec
from ..loops import LoopErrors

log = logging.getLogger("ray.serve")

POLL_S = 0.25  # progress polling while a job runs (each poll is an actor call that competes with the job)
WORKER_FAILURES = (RankFailure, ray.exceptions.RayActorError, TimeoutError)


class GroupFailed(RuntimeError):
    """The group failed, was rebuilt, and failed again."""


class GroupDriver:
    def __init__(self, spec: ModelSpec, cfg, lora_roots: list[str], placement_group, errors: LoopErrors,
                 on_rebuilt: Callable[[Any], None]):
        self.spec, self.cfg, self.lora_roots, self.pg = spec, cfg, lora_roots, placement_group
        self.errors, self.on_rebuilt = errors, on_rebuilt
        self.group = None
        self.loras: tuple = ()
        self.fatal: str | None = None  # set when the group could not be rebuilt: check_health raises it
        self.rebuilds = 0

    def start(self, loras: tuple = ()):
        """Blocking: a new SPWorkerGroup in bundles 1..sp of the replica's placement group."""
        from engine.worker_group import SPWorkerGroup
        from model.config import load_run_config

        cfg = self.cfg
        if loras:
            cfg = load_run_config({**cfg.model_dump(mode="json"),
                                   "lora_configs": [{"path": p, "strength": s} for p, s in loras]})
        bundles = list(range(1, self.spec.sp_size + 1)) if self.pg is not None else None
        self.group = SPWorkerGroup(self.spec.model_path, cfg, placement_group=self.pg, bundle_indices=bundles,
                                   num_cpus=self.spec.rank_cpus, num_gpus=1 if self.spec.device == "cuda" else 0,
                                   device=self.spec.device, num_threads=self.spec.num_threads,
                                   lora_roots=self.lora_roots or None, start_timeout=self.spec.start_timeout_s)
        self.loras = loras
        return self.group

    @property
    def runtime(self) -> dict | None:
        """What the current group runs (kernels, SP backend, compile): engine.rank.runtime_info of rank 0."""
        return self.group.runtime if self.group is not None else None

    async def rebuild(self, loras: tuple | None = None) -> None:
        """Shut the group down and start a new one in the same bundles (the old ranks' caches are gone)."""
        old, self.group = self.group, None
        if old is not None:
            await asyncio.to_thread(old.shutdown, 10.0)
        self.on_rebuilt(None)
        try:
            await asyncio.to_thread(self.start, self.loras if loras is None else loras)
        except Exception as e:
            self.fatal = f"the worker group could not be restarted: {type(e).__name__}: {e}"
            raise
        self.rebuilds += 1
        self.on_rebuilt(self.group)

    async def use_loras(self, loras: tuple, emit) -> str | None:
        """Reload the group with this LoRA set if it holds another; the error message if the set cannot load
        (the request's fault: the previous set is loaded back and the replica keeps serving)."""
        if loras == self.loras:
            return None
        emit({"type": "progress", "stage": "lora", "step": 0, "total": 1})
        previous = self.loras
        try:
            await self.rebuild(loras)
        except Exception as e:
            self.fatal = None
            await self.rebuild(previous)  # if this fails too, fatal stays set and Serve replaces the replica
            return f"LoRAs {[Path(p).name for p, _ in loras]} could not be loaded on this model: {_last_line(e)}"
        return None

    async def with_retry(self, call: Callable[[], Awaitable[Any]], emit) -> Any:
        """`call()` with one retry on a fresh group if a rank dies. Raises what the retry raised."""
        try:
            return await call()
        except WORKER_FAILURES as first:
            reason = f"{type(first).__name__}: {first}"
            log.warning("worker group failed (%s); rebuilding and retrying once", reason)
            emit({"type": "retry", "reason": reason})
            await self.rebuild()
            try:
                return await call()
            except WORKER_FAILURES as second:
                raise GroupFailed(f"the worker group failed twice: first {reason}; then "
                                  f"{type(second).__name__}: {second}") from second

    async def cancel(self, job_id: str) -> None:
        """Ask rank 0 to stop the running job after its current step."""
        if self.group is None:
            return
        try:
            await asyncio.to_thread(self.group.cancel)
        except Exception as e:  # rank 0 gone: the job fails on its own, and the cancel is moot
            self.errors.record("cancel", f"job {job_id}", e)

    async def polled(self, fn: Callable[[], Any], job_id: str, cancelled: asyncio.Event, emit) -> Any:
        """Run a blocking group call in a thread, emitting progress while it runs and passing a cancel on."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        last, cancel_sent = None, False
        while not fut.done():
            await asyncio.wait({fut}, timeout=POLL_S)
            if cancelled.is_set() and not cancel_sent:
                cancel_sent = True
                await self.cancel(job_id)
            try:
                p = await asyncio.to_thread(self.group.progress, 2.0)
            except Exception as e:  # a missed progress update: the job itself goes on
                self.errors.record("progress_polling", f"job {job_id}", e)
                continue
            if p and p != last:
                last = p
                emit({"type": "progress", **p})
        return fut.result()


def _last_line(e: BaseException) -> str:
    """The root cause of a worker's failure: the last line of its message that names an error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln.split(":")[0]]
    return (named or lines or [type(e).__name__])[-1][:500]
