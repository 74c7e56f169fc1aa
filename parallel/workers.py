"""A sequence-parallel group as Ray actors: what one Serve replica owns.

`SPWorkerGroup` starts world_size `SPWorker` actors (optionally pinned to bundles of a placement group),
each building its share of the pipeline (rank 0 the whole pipeline, the others the DiT alone). Rank 0 then
hosts the group's store on a port the OS picks and publishes (address, port); all actors join the
torch.distributed group concurrently. `run(request)` sends the request to every actor and returns rank 0's
`Generation`. No HTTP here: the Serve layer wraps this class.

Actors are threaded (`max_concurrency`), so `cancel()`, `progress()` and `health()` answer while `run` is
busy. A rank that dies shows up twice: Ray reports the actor dead, and the surviving ranks raise
`RankFailure` naming it; the group is then unhealthy and must be rebuilt (`shutdown()`, then a new group).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray
import torch

from model.config import RunConfig, load_run_config
from model.pipeline import Generation, Progress, Request

from .group import (
    GroupLayout,
    RankFailure,
    default_device,
    host_address,
    host_store,
    join,
)
from .runner import ParallelRunner, load_rank_pipeline


class SPWorker:
    """One rank: its pipeline share, its group membership, its current job's progress and cancel flag."""

    def __init__(self, rank: int, world_size: int, model_path: str, config: dict, device: str | None = None,
                 num_threads: int | None = None, lora_roots: list[str] | None = None, group_options: dict | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        self.cfg: RunConfig = load_run_config(config)
        self.device = torch.device(device) if device else default_device()
        self.group_options = group_options or {}
        self.pipe = load_rank_pipeline(model_path, self.cfg, rank, self.device, lora_roots=lora_roots)
        self.group, self.runner, self._store = None, None, None
        self._cancel = threading.Event()
        self._progress: Progress | None = None
        self._busy = False

    def endpoint(self) -> tuple[str, int]:
        """Rank 0: host the group's store on a free port; (address, port) for the others."""
        timeout = self.group_options.get("join_timeout", 60.0)
        self._store = host_store(self.world_size, 0, timeout=timeout)
        return host_address(), self._store.port

    def join(self, addr: str, port: int) -> dict:
        layout = GroupLayout.from_parallel(self.cfg.parallel)
        self.group = join(self.rank, self.world_size, addr, port, layout, device=self.device, store=self._store,
                          **self.group_options)
        self.runner = ParallelRunner(self.pipe, self.group)
        return self.health()

    def run(self, request: Request | None) -> Generation | None:
        self._cancel.clear()
        self._progress, self._busy = None, True
        try:
            return self.runner.generate(request, progress=self._on_progress, cancel=self._cancel.is_set)
        finally:
            self._busy = False

    def _on_progress(self, p: Progress) -> None:
        self._progress = p

    def cancel(self) -> None:
        self._cancel.set()

    def progress(self) -> dict | None:
        p = self._progress
        return None if p is None else {"stage": p.stage, "step": p.step, "total": p.total}

    def health(self) -> dict:
        g = self.group
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "joined": g is not None,
                "backend": g.backend if g else None, "broken": g.broken if g else None, "busy": self._busy,
                "phase": g.phase if g else None, "peers": g.peers() if g else {}}

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


class SPWorkerGroup:
    """world_size = cfg_p_size x seq_p_size Ray actors forming one parallel group (see the module docstring).

    placement_group + bundle_indices: actor i runs in bundle bundle_indices[i] (default i). num_cpus/num_gpus:
    per actor. group_options: passed to `parallel.group.join` (join_timeout, op_timeout, heartbeat_interval,
    stale_after).
    """

    def __init__(self, model_path: str, config: dict | RunConfig, *, placement_group=None,
                 bundle_indices: list[int] | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 device: str | None = None, num_threads: int | None = None, lora_roots: list[str] | None = None,
                 group_options: dict | None = None, start_timeout: float = 300.0):
        cfg = config if isinstance(config, RunConfig) else load_run_config(config)
        config = cfg.model_dump(mode="json")
        self.layout = GroupLayout.from_parallel(cfg.parallel)
        n = self.layout.world_size
        self.world_size = n
        self.group_options = dict(group_options or {})
        self._lock = threading.Lock()
        self.unhealthy: str | None = None
        options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=4)
        bundles = bundle_indices if bundle_indices is not None else list(range(n))
        if placement_group is not None and len(bundles) != n:
            raise ValueError(f"{n} workers need {n} bundle indices; got {bundles}")
        remote = ray.remote(SPWorker)
        self.actors = []
        for rank in range(n):
            opts = dict(options)
            if placement_group is not None:
                from ray.util.scheduling_strategies import (
                    PlacementGroupSchedulingStrategy,
                )

                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=bundles[rank])
            self.actors.append(remote.options(**opts).remote(rank, n, str(model_path), config, device, num_threads,
                                                             lora_roots, self.group_options))
        try:
            addr, port = ray.get(self.actors[0].endpoint.remote(), timeout=start_timeout)
            self.members = ray.get([a.join.remote(addr, port) for a in self.actors],
                                   timeout=start_timeout + self.group_options.get("join_timeout", 60.0))
        except Exception:
            self._kill()
            raise
        self.address = (addr, port)

    # ---- jobs ----
    def run(self, request: Request, timeout: float | None = None) -> Generation:
        """Generate on every rank; rank 0's result. Raises rank 0's RequestError / Cancelled as they are, and
        RankFailure (naming the ranks) when a rank died or failed — the group is unhealthy after that."""
        if self.unhealthy:
            raise RankFailure([], f"this worker group is unhealthy ({self.unhealthy}); shut it down and start a new one")
        with self._lock:
            refs = [a.run.remote(request if rank == 0 else None) for rank, a in enumerate(self.actors)]
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            if pending:
                self.unhealthy = f"ranks {[refs.index(r) for r in pending]} did not finish within {timeout} s"
                raise TimeoutError(self.unhealthy)
            outcomes = {}
            for rank, ref in enumerate(refs):
                try:
                    outcomes[rank] = ("ok", ray.get(ref))
                except ray.exceptions.RayActorError as e:
                    outcomes[rank] = ("dead", e)
                except ray.exceptions.RayTaskError as e:
                    outcomes[rank] = ("error", e.cause if e.cause is not None else e)
                except Exception as e:
                    outcomes[rank] = ("error", e)
            dead = [r for r, (kind, _) in outcomes.items() if kind == "dead"]
            kind, value = outcomes[0]
            if dead:
                self.unhealthy = f"rank(s) {dead} died"
                detail = "" if kind != "error" else f" (rank 0: {value})"
                raise RankFailure(dead, f"rank(s) {dead} of the worker group died during the job{detail}")
            if kind == "ok":
                return value
            if isinstance(value, RankFailure) or any(isinstance(v, RankFailure) for _, v in outcomes.values()):
                self.unhealthy = str(value)
            raise value

    def cancel(self) -> None:
        """Ask rank 0 to stop the running job after its current step (the others follow)."""
        self.actors[0].cancel.remote()

    def progress(self, timeout: float = 5.0) -> dict | None:
        return ray.get(self.actors[0].progress.remote(), timeout=timeout)

    def health(self, timeout: float = 10.0) -> dict:
        """{"healthy": bool, "ranks": [per-rank health or the reason it did not answer]}."""
        refs = [a.health.remote() for a in self.actors]
        ranks = []
        for rank, ref in enumerate(refs):
            try:
                ranks.append(ray.get(ref, timeout=timeout))
            except Exception as e:  # dead actor, or no answer in time
                ranks.append({"rank": rank, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        bad = [r["rank"] for r in ranks if "error" in r or r.get("broken")]
        if bad and not self.unhealthy:
            self.unhealthy = f"rank(s) {bad} dead or broken"
        return {"healthy": not bad and not self.unhealthy, "reason": self.unhealthy, "ranks": ranks}

    def shutdown(self, timeout: float = 30.0) -> None:
        """Leave the group on every live rank, then end the actors."""
        refs = [a.shutdown.remote() for a in self.actors]
        deadline = time.monotonic() + timeout
        for ref in refs:
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                pass
        self._kill()

    def _kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
