"""CausVid sessions kept by one generator replica: which are open, in which tier, and which must go.

The caches themselves live in the replica's SP worker actors (`SPWorkerGroup` session API); this class
only decides. Its policy, applied after every fragment and by a periodic sweep:

- TTL: a session idle for `ttl_s` is closed.
- Idle tier: a session idle for `idle_after_s` is offloaded to IDLE memory (`offload_session`, tier
  "idle"); it is moved back (`reload_session`, tier "active") before its next fragment. Offload and
  reload are bit-exact.
- Memory caps, least recently used first: active cache bytes (per GPU: rank 0's share) beyond
  `max_device_bytes` are offloaded; idle bytes beyond `max_idle_bytes`, and sessions beyond
  `max_sessions`, are closed.

Closing is safe because the router stores every session's state after each fragment: a closed,
evicted or lost session is rebuilt with `restore_session` on its next call (the router resends the
state), and only a session whose state is gone too is answered 410. The session being served is never
evicted to make room for itself.

All methods block (they call the worker actors): the generator calls them from a thread, under its
job lock, so a session is never touched by two calls at once.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

ACTIVE, IDLE = "active", "idle"  # the worker group's tiers: caches on the compute device / in CPU memory


class SessionBackend(Protocol):
    """The part of engine.worker_group.SPWorkerGroup this class uses."""

    def open_session(self, session_id: str, prompt: str, seed: int | None = None, height: int | None = None,
                     width: int | None = None) -> dict: ...
    def restore_session(self, session_id: str, state: dict, replace: bool = False) -> dict: ...
    def session_info(self, session_id: str) -> dict: ...
    def offload_session(self, session_id: str) -> Any: ...
    def reload_session(self, session_id: str) -> Any: ...
    def close_session(self, session_id: str) -> bool: ...


@dataclass
class Entry:
    last_used: float
    tier: str = ACTIVE
    cache_bytes: int = 0
    info: dict = field(default_factory=dict)


class SessionManager:
    """Open sessions of one replica, in LRU order (oldest first)."""

    def __init__(self, backend: SessionBackend, settings, clock: Callable[[], float] = time.monotonic):
        self.backend, self.settings, self.clock = backend, settings, clock
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.evicted = 0  # sessions closed by the policy (not by their owner)

    # ---- what the replica holds ------------------------------------------------------------------
    def __contains__(self, session_id: str) -> bool:
        return session_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def bytes_in(self, tier: str) -> int:
        return sum(e.cache_bytes for e in self.entries.values() if e.tier == tier)

    def summary(self) -> dict:
        return {"sessions": len(self.entries), "device_bytes": self.bytes_in(ACTIVE), "idle_bytes": self.bytes_in(IDLE),
                "idle_sessions": sum(e.tier == IDLE for e in self.entries.values()), "evicted": self.evicted}

    def tier(self, session_id: str) -> str | None:
        e = self.entries.get(session_id)
        return e.tier if e else None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def open(self, session_id: str, prompt: str, seed: int | None, height: int | None, width: int | None) -> dict:
        self._make_room(session_id)
        self.backend.open_session(session_id, prompt, seed=seed, height=height, width=width)
        return self._track(session_id)

    def restore(self, session_id: str, state: dict) -> dict:
        self._make_room(session_id)
        self.backend.restore_session(session_id, state, replace=True)
        return self._track(session_id)

    def ready(self, session_id: str) -> None:
        """Before a session is used: back on the device if it was idle, most recently used."""
        e = self.entries[session_id]
        if e.tier == IDLE:
            self.backend.reload_session(session_id)
            e.tier = ACTIVE
        self._touch(session_id)

    def used(self, session_id: str) -> dict:
        """After a fragment: refresh its size, then enforce the caps (never on this session)."""
        info = self._track(session_id)
        self.enforce(keep=session_id)
        return info

    def close(self, session_id: str) -> bool:
        self.entries.pop(session_id, None)
        try:
            return bool(self.backend.close_session(session_id))
        except KeyError:  # SessionNotFound: already gone from the workers
            return False

    def offload(self, session_id: str) -> None:
        e = self.entries[session_id]
        if e.tier != IDLE:
            self.backend.offload_session(session_id)
            e.tier = IDLE

    def forget_all(self) -> list[str]:
        """The worker group was rebuilt: every cache is gone (the router restores on demand)."""
        gone = list(self.entries)
        self.entries.clear()
        return gone

    # ---- policy -----------------------------------------------------------------------------------
    def sweep(self) -> list[str]:
        """Time-based rules: close past the TTL, offload past idle_after_s. Returns closed ids."""
        now = self.clock()
        closed = []
        for sid, e in list(self.entries.items()):
            idle = now - e.last_used
            if idle >= self.settings.ttl_s:
                self._evict(sid, f"idle {idle:.0f} s >= ttl_s")
                closed.append(sid)
            elif idle >= self.settings.idle_after_s and e.tier == ACTIVE:
                self.offload(sid)
        return closed

    def enforce(self, keep: str | None = None) -> list[str]:
        """Memory and count caps, least recently used first. Returns closed ids."""
        s = self.settings
        closed = self.sweep()
        for sid in self._lru(keep):
            if self.bytes_in(ACTIVE) <= s.max_device_bytes:
                break
            if self.entries[sid].tier == ACTIVE:
                self.offload(sid)
        for sid in self._lru(keep):
            if self.bytes_in(IDLE) <= s.max_idle_bytes and len(self.entries) <= s.max_sessions:
                break
            if self.entries[sid].tier == IDLE or len(self.entries) > s.max_sessions:
                self._evict(sid, "over the replica's session memory or count cap")
                closed.append(sid)
        return closed

    def _make_room(self, session_id: str) -> None:
        """A new session needs a slot: close the least recently used one if at max_sessions."""
        while len(self.entries) >= self.settings.max_sessions:
            victim = next((sid for sid in self.entries if sid != session_id), None)
            if victim is None:
                break
            self._evict(victim, "max_sessions reached")

    # ---- plumbing ----------------------------------------------------------------------------------
    def _lru(self, keep: str | None) -> list[str]:
        return [sid for sid in self.entries if sid != keep]

    def _touch(self, session_id: str) -> None:
        self.entries[session_id].last_used = self.clock()
        self.entries.move_to_end(session_id)

    def _track(self, session_id: str) -> dict:
        info = dict(self.backend.session_info(session_id))
        e = self.entries.get(session_id) or Entry(last_used=self.clock())
        e.cache_bytes = int(info.get("cache_bytes") or 0)
        e.tier = IDLE if info.get("tier") == IDLE else ACTIVE
        e.info = info
        self.entries[session_id] = e
        self._touch(session_id)
        return info

    def _evict(self, session_id: str, why: str) -> None:
        log.info("session %s closed in this replica: %s (the router can rebuild it)", session_id, why)
        self.evicted += 1
        self.close(session_id)
