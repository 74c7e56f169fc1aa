"""Each rank's heartbeat thread: the evidence that a peer is gone, when a collective fails.

A beat is JSON {"n": counter, "phase": what the rank is doing, "failed": its own error or null, "blames":
ranks it found dead}, written into rank 0's store every `interval` s; the thread reads everybody else's.
Staleness is measured on this host's clock (the time since a peer's counter last changed), so hosts need
no synchronised clocks. The store lives in rank 0: losing it means rank 0 is gone.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

KEY_PREFIX = "wanserve/"


def beat_key(rank: int) -> str:
    return f"{KEY_PREFIX}hb/{rank}"


class Heartbeat(threading.Thread):
    """Writes this rank's beat into the store every `interval` s and watches everyone else's."""

    def __init__(self, store: dist.TCPStore, rank: int, world_size: int, interval: float):
        super().__init__(name=f"wanserve-heartbeat-{rank}", daemon=True)
        self.store = store  # this thread's own client connection (store.clone())
        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.phase, self.failed, self.blames = "joined", None, []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # beat now (the phase changed)
        now = time.monotonic()
        self.peers = {r: {"n": -1, "seen": now, "phase": "?", "failed": None, "blames": []}
                      for r in range(world_size) if r != rank}
        self.store_error: str | None = None
        self.counter = 0

    def beat_value(self) -> str:
        return json.dumps({"n": self.counter, "phase": self.phase, "failed": self.failed, "blames": self.blames})

    def kick(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def run(self):
        keys = [beat_key(r) for r in self.peers]
        while not self.stop_event.is_set():
            try:
                self.counter += 1
                self.store.set(beat_key(self.rank), self.beat_value())
                values = self.store.multi_get(keys) if keys else []
            except (RuntimeError, OSError) as e:  # torch's store errors are RuntimeErrors (DistError)
                with self.lock:
                    self.store_error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log.info("rank %d: rank 0's store is unreachable (%s); the heartbeat stops (the group is gone "
                         "with rank 0)", self.rank, self.store_error)
                return
            now = time.monotonic()
            with self.lock:
                for r, raw in zip(self.peers, values):
                    beat = json.loads(bytes(raw).decode())
                    p = self.peers[r]
                    if beat["n"] != p["n"]:
                        p.update(n=beat["n"], seen=now)
                    p.update(phase=beat["phase"], failed=beat["failed"], blames=beat.get("blames", []))
            self.wake.wait(self.interval)
            self.wake.clear()

    def snapshot(self) -> tuple[dict[int, dict], str | None]:
        now = time.monotonic()
        with self.lock:
            peers = {r: {**p, "age": now - p["seen"]} for r, p in self.peers.items()}
            return peers, self.store_error

    def evidence(self, stale_after: float, store: str) -> tuple[list[int], str] | None:
        """The ranks that are gone and why, from what this thread has seen now (None: no evidence yet): a peer
        that posted its failure, a peer whose beat stopped, a rank the others found dead, rank 0's store lost
        (`store` names its address)."""
        peers, store_error = self.snapshot()
        failed = {r: p["failed"] for r, p in peers.items() if p["failed"]}
        if failed:
            return sorted(failed), "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
        stale = sorted(r for r, p in peers.items() if p["age"] > stale_after)
        if stale:
            return stale, "; ".join(f"rank {r} stopped responding (no heartbeat for {peers[r]['age']:.1f} s, "
                                    f"last phase: {peers[r]['phase']})" for r in stale)
        blamed = sorted({b for p in peers.values() for b in p["blames"]})
        if blamed:
            return blamed, f"rank(s) {blamed} found dead by the other ranks"
        if store_error is not None and self.rank != 0:
            return [0], (f"rank 0 (it hosts the group's store at {store}) is unreachable: it died or its host is "
                         f"down ({store_error})")
        return None
