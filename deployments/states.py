"""The vocabulary of job and session states, shared by the stores, the API schemas, the LightX2V routes and
the clients: one enum each, so a state is spelled in one place."""
from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    def __str__(self) -> str:  # "queued", not "JobState.queued", in f-strings and logs
        return self.value


TERMINAL_STATES = frozenset({JobState.completed, JobState.failed, JobState.cancelled})


class JobKind(str, Enum):
    video = "video"
    fragment = "fragment"

    def __str__(self) -> str:
        return self.value


class SessionStatus(str, Enum):
    """What the router says of a session. Stored: active, closed, lost. Derived when shown: idle (its cache
    is in CPU memory), evicted (no replica holds it; it is rebuilt from its stored state on its next call)."""

    active = "active"
    idle = "idle"
    evicted = "evicted"
    closed = "closed"
    lost = "lost"

    def __str__(self) -> str:
        return self.value


STORED_SESSION_STATUSES = (SessionStatus.active, SessionStatus.closed, SessionStatus.lost)
