"""The router's retention loop: old jobs and their files, idle sessions, forgotten sessions, old uploads.

Each round runs every step; each step handles its items one at a time, so one item that keeps failing
(a file that cannot be deleted, a session whose replica does not answer) is logged with its id, counted in
`wanserve_housekeeping_errors_total{loop}` and retried next round, while the rest of the round goes on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

from ..config import AppArgs
from ..loops import LoopErrors
from ..states import SessionStatus
from ..storage.jobs import JobStore
from ..storage.sessions import SessionStore

log = logging.getLogger("ray.serve")

HOUSEKEEPING_S = 60.0
EndSession = Callable[[str, SessionStatus, str], Awaitable[None]]


class Housekeeping:
    def __init__(self, args: AppArgs, jobs: JobStore, sessions: SessionStore, end_session: EndSession,
                 errors: LoopErrors):
        self.args, self.jobs, self.sessions, self.end_session, self.errors = args, jobs, sessions, end_session, errors
        self.rounds = 0

    async def run(self, period_s: float = HOUSEKEEPING_S) -> None:
        while True:
            await self.round()
            await asyncio.sleep(period_s)

    async def round(self) -> None:
        for loop, step in (("job_retention", self.purge_jobs), ("session_expiry", self.expire_sessions),
                           ("session_retention", self.purge_sessions), ("upload_retention", self.purge_uploads)):
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the step could not even list its items: the other steps still run
                self.errors.record(loop, "round", e)
        self.rounds += 1

    async def purge_jobs(self) -> None:
        await asyncio.to_thread(self.jobs.purge, None, self.errors.reporter("job_retention"))

    async def expire_sessions(self) -> None:
        s = self.args.sessions
        for sid in await asyncio.to_thread(self.sessions.expired, s.retention_s):
            try:
                await self.end_session(sid, SessionStatus.closed, f"expired: idle for more than {s.retention_s:.0f} s")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors.record("session_expiry", sid, e)

    async def purge_sessions(self) -> None:
        await asyncio.to_thread(self.sessions.purge, self.args.retention_s, None,
                                self.errors.reporter("session_retention"))

    async def purge_uploads(self) -> None:
        await asyncio.to_thread(purge_uploads, self.args.uploads_dir, self.args.retention_s,
                                self.errors.reporter("upload_retention"))


def purge_uploads(folder: Path, older_than_s: float, on_error: Callable[[str, BaseException], None]) -> int:
    """Uploaded images older than the job retention: their jobs are gone (or will be by then)."""
    cutoff, n = time.time() - older_than_s, 0
    for p in sorted(folder.glob("*")):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
        except FileNotFoundError:
            continue
        except OSError as e:
            on_error(p.name, e)
    return n
