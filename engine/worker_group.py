"""A sequence-parallel group as Ray actors: what one Serve replica owns (see ARCHITECTURE.md, "engine")."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import ray

from model.config import RunConfig, load_run_config
from model.pipeline import Generation, Request
from parallel.group import GroupLayout, RankFailure, first_line

from .causal_runner import InvalidSessionState, SessionExists, SessionNotFound, SessionsNotSupported
from .rank import has_sessions, session_model_classes
from .worker import SPWorker

__all__ = ["SPWorker", "SPWorkerGroup", "SessionNotFound", "SessionExists", "SessionsNotSupported",
           "InvalidSessionState"]

log = logging.getLogger(__name__)


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
        self.model_cls = cfg.model_cls
        self.has_sessions = has_sessions(cfg)
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
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
        self.runtime: dict = self.members[0].get("runtime") or {}  # rank 0's kernels, backend, compile (rank.py)

    # ---- jobs ----
    def run(self, request: Request, timeout: float | None = None, mp4: bool = False) -> Generation:
        """Generate on every rank; rank 0's result. Raises rank 0's RequestError / Cancelled as they are, and
        RankFailure (naming the ranks) when a rank died or failed — the group is unhealthy after that.
        A CausVid group generates `num_fragments` fragments of a throwaway session (LightX2V's one call).
        mp4: the result carries the mp4 file (`Generation.mp4`), encoded as it decoded, not the frames."""
        return self._on_every_rank("run", (request, mp4), (None, mp4), timeout)

    def _on_every_rank(self, method: str, args: tuple, other_args: tuple | None = None,
                       timeout: float | None = None):
        """Call `method` on every actor (rank 0 with `args`, the others with `other_args`, default the same),
        one call at a time per group; rank 0's return value, or the error that explains the failure."""
        self._check_healthy()
        other_args = args if other_args is None else other_args
        with self._lock:
            refs = [getattr(a, method).remote(*(args if rank == 0 else other_args))
                    for rank, a in enumerate(self.actors)]
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
            failed = {r: v for r, (k, v) in outcomes.items() if k == "error"}
            if kind == "ok" and failed:  # the ranks disagree: their shares of the state no longer match
                self.unhealthy = f"rank(s) {sorted(failed)} failed where rank 0 did not"
                why = "; ".join(f"rank {r}: {type(v).__name__}: {first_line(v)}" for r, v in sorted(failed.items()))
                log.error("%s %s: %s", method, self.unhealthy, why)
                raise RankFailure(sorted(failed), f"{method}: {self.unhealthy} ({why})")
            if kind == "ok":
                return value
            if isinstance(value, RankFailure) or any(isinstance(v, RankFailure) for _, v in outcomes.values()):
                self.unhealthy = str(value)
            raise value

    def _check_healthy(self) -> None:
        if self.unhealthy:
            raise RankFailure([], f"this worker group is unhealthy ({self.unhealthy}); shut it down and start a new one")

    def _on_actors(self, actors: list, method: str, *args, timeout: float | None = 30.0) -> list:
        """A read on some actors, without the group's lock (answers while a job runs); their results in order.
        An actor's own error is raised as itself (e.g. SessionNotFound); a dead actor as RankFailure naming its
        rank (the group is unhealthy then, and its sessions are gone with it)."""
        self._check_healthy()
        refs = [getattr(a, method).remote(*args) for a in actors]
        out = []
        for a, ref in zip(actors, refs):
            try:
                out.append(ray.get(ref, timeout=timeout))
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if e.cause is not None else e) from None
            except ray.exceptions.RayActorError:
                rank = self.actors.index(a)
                self.unhealthy = f"rank(s) [{rank}] died"
                raise RankFailure([rank], f"rank {rank} of the worker group is dead; its sessions are lost (restore "
                                          "them from their stored state into a new group)") from None
        return out

    def cancel(self) -> None:
        """Ask rank 0 to stop the running job after its current step (the others follow)."""
        self.actors[0].cancel.remote()

    def progress(self, timeout: float = 5.0) -> dict | None:
        """Rank 0's progress of the running / last job: {"stage", "step", "total"}; for a CausVid fragment also
        {"session_id", "blocks" (finished), "blocks_total"}."""
        return ray.get(self.actors[0].progress.remote(), timeout=timeout)

    # ---- CausVid sessions ----
    def _require_sessions(self) -> None:
        if not self.has_sessions:
            raise SessionsNotSupported(f"sessions need a CausVid model (model_cls {session_model_classes()}); this "
                                       f"worker group runs {self.model_cls!r}, which generates whole videos only "
                                       "(use run)")

    def open_session(self, session_id: str, prompt: str, seed: int | None = None, height: int | None = None,
                     width: int | None = None, timeout: float | None = 60.0) -> dict:
        """Open a session on every rank (cheap: the prompt is encoded and the caches allocated by its first
        fragment); returns `session_info`. SessionExists for an id already open; RequestError for a bad
        prompt or size."""
        self._require_sessions()
        self._on_every_rank("open_session", (session_id, prompt, seed, height, width), timeout=timeout)
        return self.session_info(session_id)

    def next_fragment(self, session_id: str, prompt: str | None = None, timeout: float | None = None) -> dict:
        """Generate the session's next fragment (optionally under a new prompt; the K/V cache carries over).

        Returns {"frames": uint8 [T, H, W, 3] of this fragment, "fragment": its index (0-based), "blocks":
        [first, end) session block indices, "timings": {text, dit, vae, first_block, total, communication}
        seconds, "info": session_info}. Cancellable with `cancel()` (raises Cancelled; finished blocks stay,
        and the next call makes the rest of the fragment); `progress()` counts steps and blocks;
        `fragment_blocks` streams its blocks while it runs. An idle session is reloaded first."""
        self._require_sessions()
        out = self._on_every_rank("next_fragment", (session_id, prompt), timeout=timeout)
        out["info"] = self._with_rank_bytes(out["info"])
        return out

    def fragment_blocks(self, session_id: str, since: int = 0, timeout: float | None = 30.0) -> list[np.ndarray]:
        """Decoded frames (uint8 [T, H, W, 3] per block) of the blocks the running / last `next_fragment` has
        finished, from its block `since` on. Answers while that call runs."""
        self._require_sessions()
        return self._on_actors(self.actors[:1], "fragment_blocks", session_id, since, timeout=timeout)[0]

    def session_info(self, session_id: str, timeout: float | None = 30.0) -> dict:
        """{"session_id", "fragments", "blocks", "partial_blocks", "frames", "latent_frames", "cache_bytes",
        "memory_bytes", "device", "tier" ("active" | "idle"), "last_used", "created", "busy", "seed", "height",
        "width", "prompt", "cache_bytes_per_rank", "cache_bytes_total"}: rank 0's numbers (what one GPU holds:
        compare them with a per-GPU cap) plus every rank's cache bytes. Answers while a fragment runs."""
        self._require_sessions()
        infos = self._on_actors(self.actors, "session_info", session_id, timeout=timeout)
        per_rank = [i["cache_bytes"] for i in infos]
        return {**infos[0], "cache_bytes_per_rank": per_rank, "cache_bytes_total": sum(per_rank)}

    def _with_rank_bytes(self, info: dict) -> dict:
        per_rank = [info["cache_bytes"]]
        per_rank += [i["cache_bytes"] for i in self._on_actors(self.actors[1:], "session_info", info["session_id"])]
        return {**info, "cache_bytes_per_rank": per_rank, "cache_bytes_total": sum(per_rank)}

    def list_sessions(self, timeout: float | None = 30.0) -> list[dict]:
        """`session_info` of every open session (rank 0's view, with every rank's cache bytes)."""
        self._require_sessions()
        lists = self._on_actors(self.actors, "list_sessions", timeout=timeout)
        per_rank: dict[str, list[int]] = {}
        for rank_list in lists:
            for item in rank_list:
                per_rank.setdefault(item["session_id"], []).append(item["cache_bytes"])
        return [{**item, "cache_bytes_per_rank": per_rank[item["session_id"]],
                 "cache_bytes_total": sum(per_rank[item["session_id"]])} for item in lists[0]]

    def session_state(self, session_id: str, timeout: float | None = None) -> dict:
        """`CausalSession.state_dict()` (CPU tensors and plain values; torch.save-able; no shard of any cache):
        what the router stores to rebuild the session later, here or in a group of any size. Taken between
        calls: waits for a running call of the group to finish."""
        self._require_sessions()
        self._check_healthy()
        with self._lock:
            return self._on_actors(self.actors[:1], "session_state", session_id, timeout=timeout)[0]

    def restore_session(self, session_id: str, state: dict, replace: bool = False,
                        timeout: float | None = None) -> dict:
        """Rebuild a session from `session_state` (after eviction or the loss of the replica that had it):
        rank 0 resumes its streaming decoder from the last blocks and every rank replays the clean passes its cache
        still depends on (one DiT forward each, bounded by the window), so the next fragment is the one the
        original would have made. InvalidSessionState if the
        state does not fit this model/config; SessionExists if the id is open (replace=True rebuilds it)."""
        self._require_sessions()
        self._on_every_rank("restore_session", (session_id, state, replace), timeout=timeout)
        return self.session_info(session_id)

    def offload_session(self, session_id: str, timeout: float | None = 120.0) -> dict:
        """Idle tier: every rank moves the session's caches into fresh CPU buffers (on a CPU-only machine a real
        copy, accounted as idle). Returns session_info (tier "idle")."""
        self._require_sessions()
        self._on_every_rank("offload_session", (session_id,), timeout=timeout)
        return self.session_info(session_id)

    def reload_session(self, session_id: str, timeout: float | None = 120.0) -> dict:
        """Active tier: the caches back onto every rank's compute device. Returns session_info."""
        self._require_sessions()
        self._on_every_rank("reload_session", (session_id,), timeout=timeout)
        return self.session_info(session_id)

    def close_session(self, session_id: str, timeout: float | None = 60.0) -> bool:
        """Free the session's caches on every rank; False if no such session was open (idempotent)."""
        self._require_sessions()
        return self._on_every_rank("close_session", (session_id,), timeout=timeout)

    def session_stats(self, timeout: float | None = 30.0) -> list[dict]:
        """Per rank: {"rank", "sessions", "active_bytes", "idle_bytes", "tracked_bytes", "live_session_objects"}."""
        self._require_sessions()
        return self._on_actors(self.actors, "session_stats", timeout=timeout)

    def health(self, timeout: float = 10.0) -> dict:
        """{"healthy": bool, "ranks": [per-rank health or the reason it did not answer]}."""
        refs = [a.health.remote() for a in self.actors]
        ranks = []
        for rank, ref in enumerate(refs):
            try:
                ranks.append(ray.get(ref, timeout=timeout))
            except ray.exceptions.RayError as e:  # dead actor, no answer in time, or health() itself failed
                ranks.append({"rank": rank, "error": f"{type(e).__name__}: {first_line(e)}"})
        bad = [r["rank"] for r in ranks if "error" in r or r.get("broken")]
        if bad and not self.unhealthy:
            self.unhealthy = f"rank(s) {bad} dead or broken"
        return {"healthy": not bad and not self.unhealthy, "reason": self.unhealthy, "ranks": ranks}

    def shutdown(self, timeout: float = 30.0) -> None:
        """Leave the group on every live rank, then end the actors."""
        refs = [a.shutdown.remote() for a in self.actors]
        deadline = time.monotonic() + timeout
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayError as e:  # dead already, too slow, or its group.close() raised
                # safe to go on: _kill ends the actor (and its process group) whatever state it is in
                log.warning("rank %d did not leave its group cleanly (%s: %s); killing it", rank, type(e).__name__,
                            first_line(e))
        self._kill()

    def _kill(self) -> None:
        for rank, a in enumerate(self.actors):
            try:
                ray.kill(a)
            except ray.exceptions.RayError as e:  # Ray is gone (shut down), or the handle is from another session
                # safe to go on: an actor Ray no longer knows is not running; the others are still killed
                log.warning("could not kill rank %d's actor (%s: %s)", rank, type(e).__name__, first_line(e))
        self.actors = []
