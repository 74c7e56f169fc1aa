"""The router's record of CausVid sessions: who owns each one, and the state to rebuild it from.

A session's caches live in a generator replica's workers and are soft (eviction, a worker death or a replica
restart loses them). What makes them recoverable is kept here, beside the job store and under the same
durability policy (storage/sqlite.py): one row per session in `sessions.sqlite`, and after every fragment
the session's state (`session_state()`: latents, generator states, prompts; no caches) in
`sessions/<id>.state` and the fragment's mp4 in `sessions/<id>/<fragment:06d>.mp4` (the whole video is
joined from those on demand, storage/segments.py), all written atomically and dropped together.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import torch

from model.files import PART_SUFFIX, write_atomic

from ..states import SessionStatus
from .results import OnError
from .segments import SEGMENT_RE, concat_mp4, segment_name
from .sqlite import Database

SESSION_ID_PREFIX = "ses_"
JOIN_LEFTOVER_S = 3600.0  # a join file older than this belongs to a router that died while joining

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
    """Rows in `<state_dir>/sessions.sqlite`; states and video segments in `<state_dir>/sessions/`, whole
    videos joined in `<state_dir>/tmp/`. Thread-safe."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir) / "sessions"
        self.tmp_dir = Path(state_dir) / "tmp"
        for d in (self.dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
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
        self._purge_joins(on_error)
        return done

    def _purge_joins(self, on_error: OnError | None) -> None:
        """Joined videos a dead router left behind (a live one unlinks each as soon as it has opened it)."""
        cutoff = time.time() - JOIN_LEFTOVER_S
        for p in sorted(self.tmp_dir.iterdir()):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                if on_error is None:
                    raise
                on_error(p.name, e)

    def state_path(self, session_id: str) -> Path:
        return self.dir / f"{_checked(session_id)}.state"

    def segment_path(self, session_id: str, index: int) -> Path:
        """Fragment `index`'s mp4: `sessions/<id>/<index:06d>.mp4`."""
        return self.dir / _checked(session_id) / segment_name(index)

    def save_segment(self, session_id: str, index: int, data: bytes) -> None:
        """Atomically; a retried fragment overwrites its own segment, so each index is there once."""
        write_atomic(self.segment_path(session_id, index), data)

    def missing_segments(self, session_id: str, count: int) -> list[int]:
        return [i for i in range(count) if not self.segment_path(session_id, i).is_file()]

    def open_video(self, session_id: str, count: int) -> BinaryIO:
        """Segments 0..count-1 joined into one mp4, returned open and already unlinked: the caller streams it
        from disk, and nothing stays behind whatever becomes of the response. FileNotFoundError naming the
        fragments whose segment is gone."""
        missing = self.missing_segments(session_id, count)
        if missing:
            raise FileNotFoundError(f"the video of fragment(s) {_ranges(missing)} is gone")
        fd, name = tempfile.mkstemp(prefix=f"{_checked(session_id)}.", suffix=".mp4", dir=self.tmp_dir)
        os.close(fd)
        out = Path(name)
        try:
            concat_mp4([self.segment_path(session_id, i) for i in range(count)], out)
            return out.open("rb")  # the caller closes it once streamed
        finally:
            out.unlink(missing_ok=True)

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
        """The state and the video segments (with `.part` leftovers): nothing of the session stays on disk."""
        self.state_path(session_id).unlink(missing_ok=True)
        folder = self.dir / _checked(session_id)
        if not folder.is_dir():
            return
        for p in folder.iterdir():
            if SEGMENT_RE.match(p.name.removesuffix(PART_SUFFIX)):
                p.unlink(missing_ok=True)
        folder.rmdir()  # not empty: a file not ours is there; retention reports it and tries again


def _checked(session_id: str) -> str:
    """The id if it is one of ours: it becomes a file and a folder name."""
    if not session_id.startswith(SESSION_ID_PREFIX) or not session_id[4:].isalnum():
        raise ValueError(f"not a session id: {session_id!r}")
    return session_id


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5': a message stays short when hours of segments are gone."""
    out, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
