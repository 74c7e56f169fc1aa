"""Run a function on N freshly spawned local processes that can form a group — with a hard deadline.

Tests and benchmarks need real process groups without Ray, and must never hang: `run_local(fn, n, ...)`
spawns n processes calling fn(rank, world_size, addr, port, *args), collects each one's return value (or its
traceback, or its exit code if it died), and kills every process still running at the deadline.
Return values travel pickled (plain pickle, not torch's shared-memory reductions), so a rank may exit
right after returning.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parallel.group import free_port


@dataclass
class RankOutcome:
    rank: int
    value: Any = None
    error: str | None = None  # traceback of an exception raised by fn
    exitcode: int | None = None
    returned: bool = False


class LaunchTimeout(TimeoutError):
    pass


def _entry(fn, rank, world_size, addr, port, args, threads, results):
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        value = fn(rank, world_size, addr, port, *args)
        results.put((rank, pickle.dumps(value), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


def run_local(fn: Callable, world_size: int, args: tuple = (), timeout: float = 120.0, threads: int | None = 1,
              addr: str = "127.0.0.1") -> list[RankOutcome]:
    """fn(rank, world_size, addr, port, *args) on world_size spawned processes; outcomes by rank.

    fn must be importable by name (a module-level function). Raises LaunchTimeout (after killing every
    process) if they are not all done within `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, addr, port, args, threads, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes = {r: RankOutcome(r) for r in range(world_size)}
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                rank, value, error = results.get(timeout=0.05)
                o = outcomes[rank]
                o.returned, o.error = True, error
                o.value = pickle.loads(value) if value is not None else None
            except queue.Empty:
                pass
            done = all(o.returned or (not p.is_alive()) for o, p in zip(outcomes.values(), procs))
            if done and results.empty():
                break
            if time.monotonic() > deadline:
                running = [r for r, p in enumerate(procs) if p.is_alive()]
                raise LaunchTimeout(f"ranks {running} still running after {timeout:.0f} s; killed")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())) if p.is_alive() else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for r, p in enumerate(procs):
        outcomes[r].exitcode = p.exitcode
    return [outcomes[r] for r in range(world_size)]


def values(outcomes: list[RankOutcome]) -> list[Any]:
    """Every rank's return value; raises with the failing ranks' tracebacks if any did not return."""
    bad = [o for o in outcomes if o.error or not o.returned]
    if bad:
        raise RuntimeError("\n".join(f"rank {o.rank}: " + (o.error or f"died (exit code {o.exitcode})") for o in bad))
    return [o.value for o in outcomes]
