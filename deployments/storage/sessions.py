"""The router's record of CausVid sessions: who owns each one, and the state to rebuild it from.

The caches live in a generator replica's workers and are soft: an eviction, a worker death or a replica
restart loses them. What makes them recoverable is kept here, beside the job store in state_dir: one row
per session (model, prompt, seed, size, owning replica, counters) in `sessions.sqlite`, and after every
fragment the session's state (`session_state()`: latents, generator states, prompts; no caches) in
`sessions/<id>.state`. A session whose cache is gone is rebuilt from that file on its next call; one
whose file is gone too (or that was idle past `retention_s`) is answered 410.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import torch

SESSION_ID_PREFIX = "ses_"
STATUSES = ("active", "closed", "lost")

_SCHEMA = """
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
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(Path(state_dir) / "sessions.sqlite"), isolation_level=None,
                                     check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- rows ------------------------------------------------------------------------------------------
    def create(self, session_id: str, model: str, prompt: str, seed: int, height: int, width: int,
               replica: str | None, info: dict | None = None) -> dict:
        now = time.time()
        with self._lock:
            self._conn.execute("INSERT INTO sessions (id, model, prompt, seed, height, width, created_at, last_used, "
                               "replica, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (session_id, model, prompt, seed, height, width, now, now, replica,
                                json.dumps(info or {})))
        return self.get(session_id)

    def get(self, session_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE id = ?",
                                     (session_id,)).fetchone()
        if row is None:
            return None
        d = dict(zip(_COLUMNS, row))
        d["info"] = json.loads(d["info"])
        return d

    def update(self, session_id: str, **values: Any) -> None:
        if "info" in values:
            values["info"] = json.dumps(values["info"])
        values.setdefault("last_used", time.time())
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._conn.execute(f"UPDATE sessions SET {sets} WHERE id = ?", (*values.values(), session_id))

    def count(self, status: str = "active") -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM sessions WHERE status = ?", (status,)).fetchone()[0]

    def expired(self, older_than_s: float, now: float | None = None) -> list[str]:
        """Active sessions idle longer than older_than_s."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._lock:
            rows = self._conn.execute("SELECT id FROM sessions WHERE status = 'active' AND last_used < ?",
                                      (cutoff,)).fetchall()
        return [r[0] for r in rows]

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Forget closed / lost sessions finished longer ago than older_than_s."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._lock:
            cur = self._conn.execute("DELETE FROM sessions WHERE status != 'active' AND last_used < ?", (cutoff,))
            return cur.rowcount

    # ---- states -------------------------------------------------------------------------------------------
    def state_path(self, session_id: str) -> Path:
        if not session_id.startswith(SESSION_ID_PREFIX) or not session_id[4:].isalnum():
            raise ValueError(f"not a session id: {session_id!r}")
        return self.dir / f"{session_id}.state"

    def save_state(self, session_id: str, state: dict) -> None:
        """Atomically (write + rename): a crash leaves the previous state, never half of one."""
        path = self.state_path(session_id)
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def load_state(self, session_id: str) -> dict | None:
        path = self.state_path(session_id)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def drop_state(self, session_id: str) -> None:
        self.state_path(session_id).unlink(missing_ok=True)
