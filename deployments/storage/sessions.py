"""The router's record of CausVid sessions: who owns each one, and the state to rebuild it from.

A session's caches live in a generator replica's workers and are soft (eviction, a worker death or a replica
restart loses them). What makes them recoverable is kept here, beside the job store and under the same
durability policy (storage/sqlite.py): one row per session in `sessions.sqlite`, and after every fragment
the session's state (`session_state()`: latents, generator states, prompts; no caches) in
`sessions/<id>.state`, written atomically.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from model.files import write_atomic

from ..states import SessionStatus
from .results import OnError
from .sqlite import Database

SESSION_ID_PREFIX = "ses_"

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL,
    replica TEXT,
    fragments INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'active',
    error TEXT
)
"""
_COLUMNS = ("id", "model", "prompt", "seed", "height", "width", "created_at", "last_used", "replica", "fragments",
            "info", "status", "error")


def new_session_id() -> str:
    return SESSION_ID_PREFIX + secrets.token_hex(12)


class SessionStore:
    """Rows in `<state_dir>/sessions.sqlite`, states in `<state_dir>/sessions/`. Thread-safe."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = Database(Path(state_dir) / "sessions.sqlite", (_SCHEMA_V1,), "session")

    def close(self) -> None:
        self._db.close()

    def create(self, session_id: str, model: str, prompt: str, seed: int, height: int, width: int,
               replica: str | None, info: dict | None = None) -> dict:
        now = time.time()
        with self._db.write() as c:
            c.execute("INSERT INTO sessions (id, model, prompt, seed, height, width, created_at, last_used, "
                      "replica, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (session_id, model, prompt, seed, height, width, now, now, replica, json.dumps(info or {})))
        return self.get(session_id)

    def get(self, session_id: str) -> dict | None:
        rows = self._db.read(f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            return None
        d = dict(zip(_COLUMNS, rows[0]))
        d["info"] = json.loads(d["info"])
        d["status"] = SessionStatus(d["status"])
        return d

    def update(self, session_id: str, **values: Any) -> None:
        if "info" in values:
            values["info"] = json.dumps(values["info"])
        if isinstance(values.get("status"), SessionStatus):
            values["status"] = values["status"].value
        values.setdefault("last_used", time.time())
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._db.write() as c:
            c.execute(f"UPDATE sessions SET {sets} WHERE id = ?", (*values.values(), session_id))

    def count(self, status: SessionStatus | str = SessionStatus.active) -> int:
        return self._db.read("SELECT COUNT(*) FROM sessions WHERE status = ?", (SessionStatus(status).value,))[0][0]

    def expired(self, older_than_s: float, now: float | None = None) -> list[str]:
        """Active sessions idle longer than older_than_s."""
        cutoff = (time.time() if now is None else now) - older_than_s
        rows = self._db.read("SELECT id FROM sessions WHERE status = 'active' AND last_used < ?", (cutoff,))
        return [r[0] for r in rows]

    def purge(self, older_than_s: float, now: float | None = None, on_error: OnError | None = None) -> int:
        """Forget closed / lost sessions finished longer ago than older_than_s, one at a time: with
        `on_error(id, exc)` a failing one is reported and the others go on; without, the first raises."""
        cutoff = (time.time() if now is None else now) - older_than_s
        done = 0
        for (sid,) in self._db.read("SELECT id FROM sessions WHERE status != 'active' AND last_used < ?", (cutoff,)):
            try:
                self.drop_state(sid)
                with self._db.write() as c:
                    c.execute("DELETE FROM sessions WHERE id = ? AND status != 'active'", (sid,))
                done += 1
            except Exception as e:  # this session only: the others are still purged this round
                if on_error is None:
                    raise
                on_error(sid, e)
        return done

    def state_path(self, session_id: str) -> Path:
        if not session_id.startswith(SESSION_ID_PREFIX) or not session_id[4:].isalnum():
            raise ValueError(f"not a session id: {session_id!r}")
        return self.dir / f"{session_id}.state"

    def save_state(self, session_id: str, state: dict) -> None:
        """Atomically: a crash leaves the previous state, never half of one."""
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.state_path(session_id), buf.getvalue())

    def load_state(self, session_id: str) -> dict | None:
        path = self.state_path(session_id)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def drop_state(self, session_id: str) -> None:
        self.state_path(session_id).unlink(missing_ok=True)
