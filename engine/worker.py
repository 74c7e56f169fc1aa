"""One rank of a worker group as a Ray actor: its pipeline share, its group membership, its job's progress
and cancel flag, and its side of the CausVid session calls (engine/causal_runner.py)."""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

from model.config import RunConfig, load_run_config
from model.pipeline import Generation, Progress, Request
from parallel.group import GroupLayout, default_device, host_address, host_store, join

from .causal_runner import CausalRunner, SessionsNotSupported
from .rank import has_sessions, load_rank_pipeline, rank_runner, runtime_info, session_model_classes


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
        self.causal = has_sessions(self.cfg)
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
        self.runner = rank_runner(self.pipe, self.group)
        self.runner.warm_up()  # `compile`: every rank compiles its DiT together, before the first request
        return {**self.health(), "runtime": runtime_info(self.runner)}

    def _job(self, fn, *args):
        """Run one job on this rank: fresh cancel flag and progress, busy while it runs."""
        self._cancel.clear()
        self._progress, self._busy = None, True
        try:
            return fn(*args, progress=self._on_progress, cancel=self._cancel.is_set)
        finally:
            self._busy = False

    def run(self, request: Request | None, mp4: bool = False) -> Generation | None:
        return self._job(self.runner.generate, request, mp4)

    def _on_progress(self, p: Progress) -> None:
        self._progress = p

    def cancel(self) -> None:
        self._cancel.set()

    def progress(self) -> dict | None:
        p = self._progress
        if p is None:
            return None
        out = {"stage": p.stage, "step": p.step, "total": p.total}
        current = getattr(self.runner, "current", None)
        if current is not None:  # a CausVid fragment: which session, and its blocks done so far
            out.update(current)
        return out

    # ---- CausVid sessions (one rank's side; SPWorkerGroup documents the API) ----
    def _sessions(self) -> CausalRunner:
        if not self.causal:
            raise SessionsNotSupported(f"sessions need model_cls {session_model_classes()}; this worker runs "
                                       f"{self.cfg.model_cls!r}")
        return self.runner

    def open_session(self, session_id: str, prompt: str, seed: int | None, height: int | None,
                     width: int | None) -> dict:
        return self._sessions().open(session_id, prompt, seed, height, width)

    def next_fragment(self, session_id: str, prompt: str | None) -> dict | None:
        return self._job(self._sessions().next_fragment, session_id, prompt)

    def restore_session(self, session_id: str, state: dict, replace: bool) -> dict:
        runner = self._sessions()

        def restore(progress, cancel):  # a rebuild is not cancellable: it is one forward per block
            return runner.restore(session_id, state, replace, progress=progress)
        return self._job(restore)

    def fragment_blocks(self, session_id: str, since: int) -> list[np.ndarray]:
        return self._sessions().fragment_blocks(session_id, since)

    def session_info(self, session_id: str) -> dict:
        return self._sessions().info(session_id)

    def session_state(self, session_id: str) -> dict:
        return self._sessions().state(session_id)

    def offload_session(self, session_id: str) -> dict:
        return self._sessions().offload(session_id)

    def reload_session(self, session_id: str) -> dict:
        return self._sessions().reload(session_id)

    def close_session(self, session_id: str) -> bool:
        return self._sessions().close(session_id)

    def list_sessions(self) -> list[dict]:
        return self._sessions().list()

    def session_stats(self) -> dict:
        return self._sessions().stats()

    def health(self) -> dict:
        g = self.group
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "joined": g is not None,
                "backend": g.backend if g else None, "broken": g.broken if g else None, "busy": self._busy,
                "phase": g.phase if g else None, "peers": g.peers() if g else {}}

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
