"""The router's side of CausVid sessions: open them on a replica, queue their fragments, show them, end them.

A session's caches live in one replica's workers; the router keeps its row and its state (storage/
sessions.py) and pins every call to the owner. Owners are cached in memory (filled from the store in a
thread), so the dispatcher's loop never waits on SQLite. A closed, evicted or lost session is rebuilt from
its stored state on its next call; only one whose state is gone too is 410. The whole video is joined on
disk from the fragments' mp4 segments the router keeps (storage/segments.py): no replica is asked for it.
"""
from __future__ import annotations

import asyncio
from typing import Any, BinaryIO

from engine.tiers import Tier
from model.config import format_size

from ..api.errors import ApiError, bad_request, not_found
from ..config import AppArgs
from ..states import JobKind, SessionStatus
from ..storage.jobs import Job
from ..storage.sessions import SessionStore, new_session_id
from .catalog import Catalog
from .dispatcher import REPLICA_GONE, ModelDispatcher, SessionLost
from .jobs import JobService

SESSION_CALL_TIMEOUT_S = 600.0


class SessionService:
    def __init__(self, args: AppArgs, store: SessionStore, catalog: Catalog, jobs: JobService,
                 handles: dict[str, Any], dispatchers: dict[str, ModelDispatcher]):
        self.args, self.store, self.catalog, self.jobs = args, store, catalog, jobs
        self.handles, self.dispatchers = handles, dispatchers
        self._owners: dict[str, str | None] = {}

    async def owner(self, session_id: str | None) -> str | None:
        if session_id is None:
            return None
        if session_id not in self._owners:
            row = await asyncio.to_thread(self.store.get, session_id)
            self._owners[session_id] = row["replica"] if row else None
        return self._owners[session_id]

    async def open(self, body: dict) -> dict:
        view, req = self.catalog.session_request(body)
        d = self.dispatchers[view.name]
        await d.poll(force=True)
        if not d.replicas:
            raise ApiError(503, f"model {view.name} has no running replica yet; retry shortly", "no_replica",
                           headers={"Retry-After": "5"})
        replica = d.pick(d.idle() or list(d.replicas))
        sid = new_session_id()
        call = self.handles[view.name].options(method_name="open_session")
        try:
            res = await asyncio.wait_for(call.remote(sid, req["prompt"], req["seed"], req["height"], req["width"],
                                                     route_to=replica), SESSION_CALL_TIMEOUT_S)
        except REPLICA_GONE as e:
            raise ApiError(503, f"the replica died while opening the session ({type(e).__name__}); retry",
                           "replica_died", headers={"Retry-After": "5"}) from None
        except (ValueError, KeyError) as e:  # RequestError and friends from the model
            raise bad_request(_cause(e), "prompt") from None
        await asyncio.to_thread(self.store.create, sid, view.name, req["prompt"], req["seed"], req["height"],
                                req["width"], res["replica"], res["info"])
        await asyncio.to_thread(self.store.save_state, sid, res["state"])
        self._owners[sid] = res["replica"]
        return await self.view(sid)

    async def active(self, session_id: str) -> dict:
        row = await asyncio.to_thread(self.store.get, session_id)
        if row is None:
            raise not_found("session", session_id)
        if row["status"] != SessionStatus.active:
            why = row["error"] or ("it was deleted" if row["status"] == SessionStatus.closed else "it was lost")
            raise ApiError(410, f"session {session_id} is {row['status']}: {why}. Open a new session "
                                "(POST /v1/sessions)", f"session_{row['status']}")
        return row

    async def fragment(self, session_id: str, prompt: str | None) -> Job:
        row = await self.active(session_id)
        if prompt is not None:
            prompt = self.catalog.prompt(prompt, self.catalog.views[row["model"]])
        jobs = await asyncio.to_thread(self.jobs.store.session_jobs, session_id)
        pending = sum(1 for j in jobs if not j.terminal)
        limit = self.args.sessions.max_fragments
        if limit is not None and row["fragments"] + pending >= limit:
            raise ApiError(409, f"session {session_id} has {row['fragments']} fragment(s) and {pending} pending; at "
                                f"most {limit} per session (sessions.max_fragments)", "too_many_fragments")
        await asyncio.to_thread(self.store.update, session_id)
        request = {"prompt": prompt, "height": row["height"], "width": row["width"]}
        return await self.jobs.submit(row["model"], request, JobKind.fragment, session_id)

    async def fragment_payload(self, job: Job, with_state: bool) -> dict:
        """A fragment job for its replica: the stored request, and the session's state when it must be rebuilt."""
        row = await asyncio.to_thread(self.store.get, job.session_id)
        if row is None or row["status"] != SessionStatus.active:
            raise SessionLost(f"session {job.session_id} is {row['status'] if row else 'unknown'}")
        req = {"prompt": job.request.get("prompt"), "job_id": job.id, "session_id": job.session_id}
        if with_state:
            state = await asyncio.to_thread(self.store.load_state, job.session_id)
            if state is None:
                raise SessionLost(f"session {job.session_id} was lost with its replica and its stored state is "
                                  "gone; open a new session")
            req["state"] = state
        return req

    async def after_fragment(self, job: Job, outcome: dict) -> None:
        sid, info = job.session_id, outcome.get("info") or {}
        row = await asyncio.to_thread(self.store.get, sid)
        if row is None or row["status"] != SessionStatus.active:
            return  # deleted meanwhile: keep no state for it
        index = int(info.get("fragments", 0)) - 1  # the fragment just made; a retried one overwrites its own
        if outcome.get("video") and index >= 0:  # before the row counts it: a video never misses a fragment
            await asyncio.to_thread(self.store.save_segment, sid, index, outcome["video"])
        if outcome.get("state") is not None:
            await asyncio.to_thread(self.store.save_state, sid, outcome["state"])
        await asyncio.to_thread(self.store.update, sid, replica=outcome.get("replica"),
                                fragments=int(info.get("fragments", 0)), info=info)
        self._owners[sid] = outcome.get("replica")

    async def view(self, session_id: str) -> dict:
        row = await asyncio.to_thread(self.store.get, session_id)
        if row is None:
            raise not_found("session", session_id)
        info, status, tier = dict(row["info"]), row["status"], None
        if status == SessionStatus.active:
            live = await self.on_owner(session_id, "session_info", timeout=10)
            if live:
                info.update(live)
                tier = Tier(live["tier"]) if live.get("tier") else None
                status = SessionStatus.idle if tier == Tier.idle else SessionStatus.active
            else:
                status = SessionStatus.evicted
        jobs = await asyncio.to_thread(self.jobs.store.session_jobs, session_id)
        mem = info.get("memory_bytes")
        return {"id": session_id, "model": row["model"], "status": status.value, "prompt": row["prompt"],
                "seed": row["seed"], "size": format_size(row["height"], row["width"]),
                "created_at": int(row["created_at"]), "last_used_at": int(row["last_used"]),
                "fragments": int(info.get("fragments", row["fragments"]) or 0),
                "frames": int(info.get("frames", 0) or 0),
                "latent_frames": int(info.get("latent_frames", 0) or 0),
                "cache_bytes": int(info.get("cache_bytes", 0) or 0) if tier is not None else 0,
                "memory_bytes": (sum(mem.values()) if isinstance(mem, dict) else int(mem or 0)) if tier else 0,
                "tier": tier.value if tier else None, "replica": row["replica"] if tier else None,
                "jobs": [j.id for j in jobs], "error": row["error"]}

    async def on_owner(self, session_id: str, method: str, *args, timeout: float = 10, **kw) -> Any:
        """Call a session method on the replica that holds the session; None if it is gone."""
        row = await asyncio.to_thread(self.store.get, session_id)
        d = self.dispatchers.get(row["model"]) if row else None
        if d is None or row["replica"] is None:
            return None
        if not d.alive(row["replica"]):
            await d.poll(force=True)
            if not d.alive(row["replica"]):
                return None
        try:
            call = self.handles[row["model"]].options(method_name=method)
            return await asyncio.wait_for(call.remote(session_id, *args, route_to=row["replica"], **kw), timeout)
        except (asyncio.TimeoutError, *REPLICA_GONE):
            return None

    async def video(self, session_id: str) -> BinaryIO:
        """The whole video so far, joined from the segments on disk (memory stays flat however long the
        session runs): an open file, already unlinked, for the caller to stream and close."""
        row = await self.active(session_id)
        if row["fragments"] == 0:
            raise ApiError(409, f"session {session_id} has no frames yet: generate a fragment first "
                                f"(POST /v1/sessions/{session_id}/fragments)", "no_frames")
        try:
            return await asyncio.to_thread(self.store.open_video, session_id, row["fragments"])
        except (FileNotFoundError, RuntimeError) as e:
            await self.active(session_id)  # ended while joining: its segments went with it (410)
            if isinstance(e, FileNotFoundError):
                raise ApiError(410, f"session {session_id}: {e}; its whole video cannot be made any more (its "
                                    "fragments' own videos may still be at /v1/videos/{id}/content)",
                               "session_video_gone") from None
            raise

    async def close(self, session_id: str) -> dict:
        row = await asyncio.to_thread(self.store.get, session_id)
        if row is None:
            raise not_found("session", session_id)
        if row["status"] == SessionStatus.active:
            for j in await asyncio.to_thread(self.jobs.store.session_jobs, session_id):
                if not j.terminal:
                    await self.jobs.cancel(j.id)
            await self.end(session_id, SessionStatus.closed, "deleted by its owner")
        return {"id": session_id, "object": "session", "deleted": True}

    async def end(self, session_id: str, status: SessionStatus | str, why: str) -> None:
        await self.on_owner(session_id, "close_session", timeout=60)
        await asyncio.to_thread(self.store.update, session_id, status=SessionStatus(status), error=why)
        await asyncio.to_thread(self.store.drop_state, session_id)
        self._owners.pop(session_id, None)


def _cause(e: BaseException) -> str:
    """The message of the exception a replica raised (RayTaskError wraps it)."""
    cause = getattr(e, "cause", None) or e
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
