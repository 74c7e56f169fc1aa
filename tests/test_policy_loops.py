"""Policy loops never fail silently: in every loop an item that raises is logged with its id and counted,
the rest of the round is handled, and the loop runs again next round (where the item is tried again)."""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.config import SessionSettings, parse_args
from deployments.loops import LoopErrors
from deployments.replica import jobs as replica_jobs
from deployments.replica.generator import Generator
from deployments.replica.group import GroupDriver
from deployments.replica.sessions import SessionManager
from deployments.router.dispatcher import ModelDispatcher
from deployments.router.housekeeping import Housekeeping
from deployments.states import SessionStatus
from deployments.storage.jobs import JobStore
from deployments.storage.sessions import SessionStore

REPO = Path(__file__).resolve().parents[1]
ARGS = {"models": [{"name": "m", "model_path": "/models/m", "model_cls": "wan2.1_distill", "task": "t2v",
                    "config_json": str(REPO / "configs" / "tiny" / "distill_t2v.json")}],
        "retention_s": 100, "sessions": {"retention_s": 50}}


def failing_once(fn, bad, exc=OSError("disk says no")):
    """fn, except that its first call whose first argument is `bad` raises exc."""
    state = {"raised": False}

    def wrapper(*args, **kw):
        if args and args[0] == bad and not state["raised"]:
            state["raised"] = True
            raise exc
        return fn(*args, **kw)
    return wrapper


@pytest.fixture
def router(tmp_path):
    args = parse_args({**ARGS, "state_dir": str(tmp_path)})
    jobs = JobStore(tmp_path / "jobs.sqlite", tmp_path / "results", retention_s=args.retention_s)
    sessions = SessionStore(tmp_path)
    ended: list[str] = []

    async def end_session(sid, status, why):
        sessions.update(sid, status=status, error=why)
        ended.append(sid)

    errors = LoopErrors()
    yield SimpleNamespace(args=args, jobs=jobs, sessions=sessions, ended=ended, errors=errors,
                          hk=Housekeeping(args, jobs, sessions, end_session, errors))
    jobs.close()
    sessions.close()


def finished_job(store: JobStore, at: float) -> str:
    job = store.create("m", {"prompt": "p"})
    store.claim_next(["m"])
    store.complete(job.id, store.write_result(job.id, b"video"))
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (at, job.id))
    return job.id


def test_job_retention_goes_on_past_a_failing_job(router, caplog):
    old = time.time() - 1000
    a, b = finished_job(router.jobs, old), finished_job(router.jobs, old)
    router.jobs.files.of_job = failing_once(router.jobs.files.of_job, a)
    with caplog.at_level(logging.WARNING, "ray.serve"):
        asyncio.run(router.hk.round())
    assert router.jobs.get(a) is not None and router.jobs.get(b) is None  # b purged in the same round
    assert router.errors.counts["job_retention"] == 1 and a in caplog.text
    asyncio.run(router.hk.round())  # next round: a goes too
    assert router.jobs.get(a) is None and not list(router.jobs.results_dir.iterdir())
    assert router.errors.counts["job_retention"] == 1 and router.hk.rounds == 2


def test_session_expiry_goes_on_past_a_failing_session(router, caplog):
    for sid in ("ses_aaaa", "ses_bbbb"):
        router.sessions.create(sid, "m", "p", 1, 32, 32, "r1")
        with sqlite3.connect(router.sessions.dir.parent / "sessions.sqlite") as c:
            c.execute("UPDATE sessions SET last_used = ? WHERE id = ?", (time.time() - 1000, sid))
    router.hk.end_session = failing_once(router.hk.end_session, "ses_aaaa", RuntimeError("replica did not answer"))
    with caplog.at_level(logging.WARNING, "ray.serve"):
        asyncio.run(router.hk.round())
    assert router.ended == ["ses_bbbb"] and router.errors.counts["session_expiry"] == 1
    assert "ses_aaaa" in caplog.text and "replica did not answer" in caplog.text
    asyncio.run(router.hk.round())
    assert router.ended == ["ses_bbbb", "ses_aaaa"]
    assert router.sessions.get("ses_aaaa")["status"] == SessionStatus.closed


def test_session_retention_goes_on_past_a_failing_session(router, caplog):
    for sid in ("ses_cccc", "ses_dddd"):
        router.sessions.create(sid, "m", "p", 1, 32, 32, None)
        router.sessions.save_state(sid, {"x": 1})
        router.sessions.update(sid, status=SessionStatus.lost, last_used=time.time() - 1000)
    router.sessions.drop_state = failing_once(router.sessions.drop_state, "ses_cccc")
    with caplog.at_level(logging.WARNING, "ray.serve"):
        asyncio.run(router.hk.round())
    assert router.sessions.get("ses_cccc") is not None and router.sessions.get("ses_dddd") is None
    assert router.errors.counts["session_retention"] == 1 and "ses_cccc" in caplog.text
    asyncio.run(router.hk.round())
    assert router.sessions.get("ses_cccc") is None and not list(router.sessions.dir.iterdir())


def test_upload_retention_goes_on_past_a_failing_file(router, caplog, monkeypatch):
    up = router.args.uploads_dir
    up.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        (up / name).write_bytes(b"x")
        os.utime(up / name, (time.time() - 1000, time.time() - 1000))
    real_unlink = Path.unlink
    fail = {"armed": True}

    def unlink(self, *a, **k):
        if self.name == "a.png" and fail.pop("armed", False):
            raise PermissionError("read-only")
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING, "ray.serve"):
        asyncio.run(router.hk.round())
    assert sorted(p.name for p in up.iterdir()) == ["a.png"] and router.errors.counts["upload_retention"] == 1
    assert "a.png" in caplog.text
    asyncio.run(router.hk.round())
    assert not list(up.iterdir())


def test_a_step_that_cannot_list_its_items_does_not_stop_the_round(router):
    old = time.time() - 1000
    gone = finished_job(router.jobs, old)
    router.sessions.expired = lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked"))
    asyncio.run(router.hk.round())
    assert router.errors.counts["session_expiry"] == 1 and router.jobs.get(gone) is None


# ---- the replica's session policy --------------------------------------------------------------------------

class Group:
    def __init__(self):
        self.sessions = {}

    def open_session(self, sid, prompt, seed=None, height=None, width=None):
        self.sessions[sid] = {"cache_bytes": 100, "tier": "active"}

    def session_info(self, sid):
        return dict(self.sessions[sid])

    def offload_session(self, sid):
        self.sessions[sid]["tier"] = "idle"

    def reload_session(self, sid):
        self.sessions[sid]["tier"] = "active"

    def close_session(self, sid):
        return self.sessions.pop(sid, None) is not None


def test_session_sweep_goes_on_past_a_failing_session(caplog):
    clock = SimpleNamespace(t=0.0)
    group, errors = Group(), LoopErrors()
    mgr = SessionManager(group, SessionSettings(ttl_s=100, idle_after_s=10), clock=lambda: clock.t, errors=errors)
    for sid in ("s1", "s2", "s3"):
        mgr.open(sid, "p", 1, 32, 32)
    group.offload_session = failing_once(group.offload_session, "s1", RuntimeError("rank 1 busy"))
    clock.t = 20
    with caplog.at_level(logging.WARNING, "ray.serve"):
        mgr.sweep()
    assert (mgr.tier("s1"), mgr.tier("s2"), mgr.tier("s3")) == ("active", "idle", "idle")
    assert errors.counts["session_idle_tier"] == 1 and "session s1" in caplog.text
    mgr.sweep()  # next round: s1 goes to the idle tier too
    assert mgr.tier("s1") == "idle" and group.sessions["s1"]["tier"] == "idle"


def test_generator_sweeper_loop_survives_a_failing_sweep():
    calls = []

    def sweep():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("actor call timed out")

    me = SimpleNamespace(_lock=asyncio.Lock(), driver=SimpleNamespace(group=object()), errors=LoopErrors(),
                         sessions=SimpleNamespace(sweep=sweep), replica_id="r1")

    async def run():
        task = asyncio.ensure_future(Generator._sweeper(me, period_s=0.01))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert me.errors.counts["session_sweep"] == 1 and len(calls) >= 3


# ---- the replica's block forwarding and progress polling --------------------------------------------------

def test_block_forwarding_retries_a_failing_block_in_order(monkeypatch, caplog):
    blocks = [np.zeros((4, 16, 16, 3), np.uint8) + i for i in range(3)]
    group = SimpleNamespace(session_info=lambda sid: {"blocks": 5 + len(blocks)},
                            fragment_blocks=lambda sid, since: blocks[since:])
    real = replica_jobs.mp4_bytes
    fail = {"armed": True}

    def mp4(frames, fps):
        if int(frames[0, 0, 0, 0]) == 1 and fail.pop("armed", False):
            raise OSError("ffmpeg died")
        return real(frames, fps)
    monkeypatch.setattr(replica_jobs, "mp4_bytes", mp4)
    sent, errors = [], LoopErrors()
    fwd = replica_jobs.BlockForwarder(group, "ses_x", 5, 16, sent.append, errors, "vid_1")
    with caplog.at_level(logging.WARNING, "ray.serve"):
        asyncio.run(fwd.forward())
    assert [e["index"] for e in sent] == [0] and errors.counts["block_forwarding"] == 1
    assert "job vid_1 session ses_x block 1" in caplog.text
    asyncio.run(fwd.forward())  # next poll: block 1, then 2, each once
    asyncio.run(fwd.forward())
    assert [e["index"] for e in sent] == [0, 1, 2] and all(e["video"][4:8] == b"ftyp" for e in sent)


def test_progress_polling_goes_on_past_a_failing_poll(caplog):
    progress = iter([RuntimeError("actor restarting")] + [{"stage": "dit", "step": i, "total": 3} for i in (1, 2, 3)])

    def poll(timeout):
        p = next(progress, {"stage": "dit", "step": 3, "total": 3})
        if isinstance(p, Exception):
            raise p
        return p

    errors = LoopErrors()
    driver = GroupDriver(SimpleNamespace(), None, [], None, errors, lambda g: None)
    driver.group = SimpleNamespace(progress=poll, cancel=lambda: None)
    events = []

    async def run():
        return await driver.polled(lambda: time.sleep(1.2) or "done", "vid_2", asyncio.Event(), events.append)

    with caplog.at_level(logging.WARNING, "ray.serve"):
        assert asyncio.run(run()) == "done"
    assert errors.counts["progress_polling"] == 1 and "job vid_2" in caplog.text
    assert [e["step"] for e in events] == [1, 2, 3]


# ---- the router's start-up and dispatch loops ------------------------------------------------------------

class Broadcast:
    def __init__(self, answers):
        self.answers = answers

    async def results_async(self, **kw):
        if isinstance(self.answers, Exception):
            raise self.answers
        return self.answers


def test_cancel_orphans_goes_on_past_a_failing_replica(tmp_path, caplog):
    store = JobStore(tmp_path / "j.sqlite", tmp_path / "r")
    errors = LoopErrors()
    handle = SimpleNamespace(broadcast=lambda method: Broadcast([RuntimeError("replica r2 is gone"), "vid_9", None]))
    d = ModelDispatcher("m", handle, store, SimpleNamespace(), errors)
    with caplog.at_level(logging.WARNING, "ray.serve"):
        assert asyncio.run(d.stop_orphans()) == ["vid_9"]
    assert errors.counts["cancel_orphans"] == 1 and "replica r2 is gone" in caplog.text
    handle.broadcast = lambda method: Broadcast(["vid_10"])  # the next router start: every replica answers
    assert asyncio.run(d.stop_orphans()) == ["vid_10"] and errors.counts["cancel_orphans"] == 1
    store.close()


def test_dispatch_loop_survives_a_failing_round(tmp_path):
    store = JobStore(tmp_path / "j.sqlite", tmp_path / "r")
    errors = LoopErrors()
    d = ModelDispatcher("m", SimpleNamespace(), store, SimpleNamespace(), errors)
    rounds = []

    async def dispatch():
        rounds.append(1)
        if len(rounds) == 1:
            raise sqlite3.OperationalError("database is locked")

    d.dispatch = dispatch

    async def run():
        d.start()
        while len(rounds) < 2:
            d.wake.set()
            await asyncio.sleep(0.05)
        await d.stop()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert errors.counts["dispatch"] == 1 and len(rounds) >= 2
    store.close()
