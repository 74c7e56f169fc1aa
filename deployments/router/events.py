"""Live job events for server-sent-event subscribers: one in-memory queue per subscriber, fed by the
dispatchers (progress, blocks, retries) and by state changes. Durable state stays in the job store;
a subscriber that connects late starts from the stored job."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from ..storage.jobs import Job

RELAYED = ("progress", "block", "retry", "started")


class EventHub:
    def __init__(self):
        self._subs: dict[str, set[asyncio.Queue]] = {}

    def publish(self, job_id: str, event: dict | None = None) -> None:
        for q in list(self._subs.get(job_id, ())):
            q.put_nowait(event or {"type": "update"})

    async def events(self, job_id: str, get_job: Callable[[str], Awaitable[Job]],
                     heartbeat_s: float = 15.0) -> AsyncIterator[dict]:
        """The job as it is now, then every event until it ends (`job` snapshots after state changes)."""
        q: asyncio.Queue = asyncio.Queue()
        self._subs.setdefault(job_id, set()).add(q)
        try:
            job = await get_job(job_id)
            yield {"type": "job", "job": job}
            while not job.terminal:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=heartbeat_s)
                except asyncio.TimeoutError:
                    yield {"type": "heartbeat"}
                    job = await get_job(job_id)
                    continue
                job = await get_job(job_id)
                if ev.get("type") in RELAYED:
                    yield ev
                if ev.get("type") in ("update", "started") or job.terminal:
                    yield {"type": "job", "job": job}
        finally:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    self._subs.pop(job_id, None)
