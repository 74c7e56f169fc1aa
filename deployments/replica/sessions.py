"""CausVid sessions kept by one generator replica: which are open, and which must go to CPU or close.

The caches live in the replica's SP worker actors (`SPWorkerGroup`'s session API); this class only decides.
Its policy (after every fragment, and in a periodic sweep): TTL closes, an idle tier (offload to CPU after
`idle_after_s`, reload before use, bit-exact), LRU caps on device bytes (offload), idle bytes and the session
count (close). Closing is safe: the router stores every session's state and rebuilds it on its next call.
A session's tier and size are the workers' (their last `session_info`), never a second copy kept here.
All methods block (they call the actors): the generator runs them in a thread, under its job lock.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from engine.tiers import Tier

from ..loops import LoopErrors

log = logging.getLogger(__name__)


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
    info: dict = field(default_factory=dict)  # the workers' last session_info

    @property
    def tier(self) -> Tier:
        return Tier(self.info.get("tier") or Tier.active)

    @property
    def cache_bytes(self) -> int:
        return int(self.info.get("cache_bytes") or 0)


class SessionManager:
    """Open sessions of one replica, in LRU order (oldest first)."""

    def __init__(self, backend: SessionBackend, settings, clock: Callable[[], float] = time.monotonic,
                 errors: LoopErrors | None = None):
        self.backend, self.settings, self.clock = backend, settings, clock
        self.errors = errors or LoopErrors()
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.evicted = 0  # sessions closed by the policy (not by their owner)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def bytes_in(self, tier: Tier) -> int:
        return sum(e.cache_bytes for e in self.entries.values() if e.tier == tier)

    def summary(self) -> dict:
        return {"sessions": len(self.entries), "device_bytes": self.bytes_in(Tier.active),
                "idle_bytes": self.bytes_in(Tier.idle),
                "idle_sessions": sum(e.tier == Tier.idle for e in self.entries.values()), "evicted": self.evicted}

    def tier(self, session_id: str) -> Tier | None:
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
        if self.entries[session_id].tier == Tier.idle:
            self.backend.reload_session(session_id)
            self._refresh(session_id)
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
        if self.entries[session_id].tier != Tier.idle:
            self.backend.offload_session(session_id)
            self._refresh(session_id)

    def forget_all(self) -> list[str]:
        """The worker group was rebuilt: every cache is gone (the router restores on demand)."""
        gone = list(self.entries)
        self.entries.clear()
        return gone

    # ---- policy: each session in its own try (a failing one is logged, counted and tried next round) ----
    def sweep(self) -> list[str]:
        """Time-based rules: close past the TTL, offload past idle_after_s. Returns closed ids."""
        now, closed = self.clock(), []
        for sid, e in list(self.entries.items()):
            idle = now - e.last_used
            if idle >= self.settings.ttl_s:
                if self._policy("session_ttl", sid, self._evict, sid, f"idle {idle:.0f} s >= ttl_s"):
                    closed.append(sid)
            elif idle >= self.settings.idle_after_s and e.tier == Tier.active:
                self._policy("session_idle_tier", sid, self.offload, sid)
        return closed

    def enforce(self, keep: str | None = None) -> list[str]:
        """Memory and count caps, least recently used first. Returns closed ids."""
        s = self.settings
        closed = self.sweep()
        for sid in self._lru(keep):
            if self.bytes_in(Tier.active) <= s.max_device_bytes:
                break
            if self.entries[sid].tier == Tier.active:
                self._policy("session_device_cap", sid, self.offload, sid)
        for sid in self._lru(keep):
            if self.bytes_in(Tier.idle) <= s.max_idle_bytes and len(self.entries) <= s.max_sessions:
                break
            if self.entries[sid].tier == Tier.idle or len(self.entries) > s.max_sessions:
                if self._policy("session_caps", sid, self._evict, sid,
                                "over the replica's session memory or count cap"):
                    closed.append(sid)
        return closed

    def _make_room(self, session_id: str) -> None:
        """A new session needs a slot: close the least recently used one if at max_sessions."""
        while len(self.entries) >= self.settings.max_sessions:
            victim = next((sid for sid in self.entries if sid != session_id), None)
            if victim is None:
                break
            self._evict(victim, "max_sessions reached")

    def _policy(self, loop: str, sid: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # this session only: the rest of the round goes on
            self.errors.record(loop, f"session {sid}", e)
            return False

    # ---- plumbing ----------------------------------------------------------------------------------
    def _lru(self, keep: str | None) -> list[str]:
        return [sid for sid in self.entries if sid != keep]

    def _touch(self, session_id: str) -> None:
        self.entries[session_id].last_used = self.clock()
        self.entries.move_to_end(session_id)

    def _refresh(self, session_id: str) -> dict:
        info = dict(self.backend.session_info(session_id))
        self.entries.setdefault(session_id, Entry(last_used=self.clock())).info = info
        return info

    def _track(self, session_id: str) -> dict:
        info = self._refresh(session_id)
        self._touch(session_id)
        return info

    def _evict(self, session_id: str, why: str) -> None:
        log.info("session %s closed in this replica: %s (the router can rebuild it)", session_id, why)
        self.evicted += 1
        self.close(session_id)
