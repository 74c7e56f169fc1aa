"""JobStore: transitions, paging, concurrent claims, restart + recover, retention, WAL."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from deployments.states import TERMINAL_STATES, JobState
from deployments.storage.jobs import Job, JobStore
from deployments.storage.results import JOB_ID_RE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "state" / "jobs.sqlite", tmp_path / "state" / "results", retention_s=100)
    yield s
    s.close()


def running(store: JobStore, model="m", **req) -> Job:
    job = store.create(model, req or {"prompt": "p"})
    claimed = store.claim_next([model])
    assert claimed is not None and claimed.id == job.id
    return claimed


def set_finished_at(store: JobStore, job_id: str, t: float) -> None:
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (t, job_id))


# -- model ------------------------------------------------------------------------------------------

def test_create_and_get(store):
    job = store.create("wan-t2v", {"prompt": "a fox", "seed": 3, "size": [480, 832]}, session_id=None)
    assert JOB_ID_RE.match(job.id)
    assert job.state is JobState.queued and job.progress == 0 and job.attempts == 0
    assert job.kind == "video" and job.result is None and not job.cancel_requested
    got = store.get(job.id)
    assert got == job
    assert json.loads(json.dumps(got.model_dump(mode="json")))["request"]["size"] == [480, 832]
    assert got.model_dump(mode="json")["state"] == "queued"
    frag = store.create("causvid", {"prompt": "x"}, kind="fragment", session_id="sess-1")
    assert store.get(frag.id).kind == "fragment" and store.get(frag.id).session_id == "sess-1"
    assert store.get("vid_" + "0" * 24) is None
    with pytest.raises(ValueError):
        store.create("m", {}, kind="image")
    assert {s for s in JobState if s.terminal} == TERMINAL_STATES == {
        JobState.completed, JobState.failed, JobState.cancelled}
    assert f"{JobState.in_progress}" == "in_progress" and JobState("cancelled") is JobState.cancelled


def test_happy_path(store):
    job = store.create("m", {"prompt": "p"})
    t0 = time.time()
    job = store.claim_next(["m"])
    assert job.state is JobState.in_progress and job.attempts == 1 and job.started_at >= t0 - 1
    job = store.progress(job.id, 1, 4, "denoise")
    assert (job.step, job.total, job.stage, job.progress) == (1, 4, "denoise", 25)
    job = store.progress(job.id, 4, 4, "denoise")
    assert job.progress == 99  # 100 only once complete
    path = store.new_result_path(job.id)
    assert path == store.results_dir / f"{job.id}.mp4"
    path.write_bytes(b"mp4")
    done = store.complete(job.id, path, {"denoise_s": 1.5, "vae_s": 0.2})
    assert done.state is JobState.completed and done.progress == 100 and done.result == f"{job.id}.mp4"
    assert done.timings == {"denoise_s": 1.5, "vae_s": 0.2} and done.finished_at >= done.started_at
    assert store.result_path(done).read_bytes() == b"mp4" and store.result_path(done.id) == path
    # terminal: no more changes
    assert store.progress(job.id, 1, 4) is None
    assert store.complete(job.id, path.name) is None
    assert store.fail(job.id, "late") is None
    assert store.requeue(job.id) is None
    assert store.finish_cancelled(job.id) is None
    assert store.cancel(job.id) == done
    assert store.get(job.id) == done


def test_fail(store):
    job = running(store)
    failed = store.fail(job.id, "CUDA out of memory", timings={"denoise_s": 2})
    assert failed.state is JobState.failed and failed.error == "CUDA out of memory"
    assert failed.finished_at is not None and failed.timings == {"denoise_s": 2}
    queued = store.create("m", {})
    assert store.fail(queued.id, "model removed").state is JobState.failed  # queued -> failed is allowed
    assert store.fail("vid_" + "1" * 24, "x") is None
    with pytest.raises(ValueError):
        store.result_path(failed)


def test_cancel_queued(store):
    job = store.create("m", {})
    c = store.cancel(job.id)
    assert c.state is JobState.cancelled and c.finished_at is not None
    assert store.claim_next(["m"]) is None
    assert store.cancel(job.id) == c  # unchanged
    assert store.cancel("vid_" + "2" * 24) is None


def test_cancel_running_then_worker_finishes_cancelled(store):
    job = running(store)
    c = store.cancel(job.id)
    assert c.state is JobState.in_progress and c.cancel_requested
    assert store.progress(job.id, 2, 4).progress == 50  # still running until the worker stops
    part = store.results_dir / f"{job.id}.mp4.part"
    part.write_bytes(b"half")
    done = store.finish_cancelled(job.id)
    assert done.state is JobState.cancelled and done.finished_at is not None and not part.exists()
    # the worker's late completion does not resurrect it
    store.new_result_path(job.id).write_bytes(b"late")
    assert store.complete(job.id, f"{job.id}.mp4") is None
    assert store.get(job.id).state is JobState.cancelled and store.get(job.id).result is None


def test_cancel_wins_over_complete_fail_requeue(store):
    a, b, c = running(store), running(store), running(store)
    for j in (a, b, c):
        store.cancel(j.id)
    path = store.new_result_path(a.id)
    path.write_bytes(b"done anyway")
    ended = store.complete(a.id, path.name, {"t": 1})
    assert ended.state is JobState.cancelled and ended.result is None and not path.exists()
    assert store.fail(b.id, "CancelledError").state is JobState.cancelled
    assert store.get(b.id).error is None
    assert store.requeue(c.id).state is JobState.cancelled
    assert store.claim_next(["m"]) is None


def test_finish_cancelled_needs_running(store):
    job = store.create("m", {})
    assert store.finish_cancelled(job.id) is None and store.get(job.id).state is JobState.queued
    running_job = store.claim_next(["m"])
    assert store.finish_cancelled(running_job.id).state is JobState.cancelled  # e.g. replica shutting down


def test_requeue_keeps_place_and_counts_attempts(store):
    first = store.create("m", {"n": 1})
    store.create("m", {"n": 2})
    job = store.claim_next(["m"])
    assert job.id == first.id
    store.progress(job.id, 3, 4, "denoise")
    store.new_result_path(job.id).with_suffix(".mp4.part").write_bytes(b"x")
    q = store.requeue(job.id)
    assert q.state is JobState.queued and q.progress == 0 and q.step == 0 and q.stage is None
    assert q.started_at is None and q.attempts == 1
    assert not list(store.results_dir.glob(f"{job.id}*"))
    again = store.claim_next(["m"])
    assert again.id == first.id and again.attempts == 2  # oldest first, even after a retry
    assert store.requeue(store.create("m", {}).id) is None  # queued: nothing to requeue


def test_stale_attempt_is_ignored(store, caplog):
    caplog.set_level("WARNING", logger="deployments.storage.jobs")
    job = running(store)
    assert store.requeue(job.id, attempt=1).state is JobState.queued
    second = store.claim_next(["m"])
    assert second.attempts == 2
    assert store.progress(job.id, 1, 4, attempt=1) is None  # the first worker, still running somewhere
    assert store.complete(job.id, f"{job.id}.mp4", attempt=1) is None
    assert store.fail(job.id, "x", attempt=1) is None
    assert store.finish_cancelled(job.id, attempt=1) is None
    assert store.get(job.id).state is JobState.in_progress
    assert "complete" in caplog.text and "stale attempt 1" in caplog.text  # reported, not silent
    assert store.complete(job.id, f"{job.id}.mp4", attempt=2).state is JobState.completed


def test_invalid_transitions_do_not_change_terminal_jobs(store):
    ends = {
        JobState.completed: lambda j: store.complete(j.id, f"{j.id}.mp4"),
        JobState.failed: lambda j: store.fail(j.id, "boom"),
        JobState.cancelled: lambda j: store.finish_cancelled(j.id),
    }
    for state, end in ends.items():
        job = end(running(store))
        assert job.state is state
        before = store.get(job.id)
        assert store.progress(job.id, 1, 2) is None
        assert store.complete(job.id, f"{job.id}.mp4") is None
        assert store.fail(job.id, "again") is None
        assert store.requeue(job.id) is None
        assert store.finish_cancelled(job.id) is None
        assert store.cancel(job.id) == before
        assert store.recover() == 0
        assert store.get(job.id) == before


def test_claim_order_and_models(store):
    a1 = store.create("a", {})
    b1 = store.create("b", {})
    a2 = store.create("a", {})
    c1 = store.create("c", {})
    assert store.claim_next([]) is None
    assert store.claim_next(["b"]).id == b1.id
    assert store.claim_next(["a", "c"]).id == a1.id
    assert store.claim_next(["c", "a"]).id == a2.id
    assert store.claim_next("c").id == c1.id  # a single model name is accepted too
    assert store.claim_next(["a", "b", "c"]) is None


def test_result_names_are_confined(store, tmp_path):
    job = running(store)
    for bad in ("../escape.mp4", str(tmp_path / "elsewhere.mp4"), ""):
        with pytest.raises(ValueError):
            store.complete(job.id, bad)
    assert store.get(job.id).state is JobState.in_progress
    with pytest.raises(ValueError):
        store.new_result_path("../../etc/passwd")


def test_atomic_result_helpers(store):
    job = running(store)
    with pytest.raises(RuntimeError), store.atomic_result(job.id) as part:
        assert part.name == f"{job.id}.mp4.part"
        part.write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert not list(store.results_dir.iterdir())
    name = store.write_result(job.id, b"\x00\x00\x00\x18ftypmp42")
    assert name == f"{job.id}.mp4" and not (store.results_dir / f"{name}.part").exists()
    assert store.complete(job.id, name).result == name


def test_list_paging(store):
    ids = [store.create("a" if i % 3 else "b", {"i": i}).id for i in range(45)]
    pages, after = [], None
    while True:
        page = store.list(limit=20, after=after)
        if not page:
            break
        pages.append(page)
        after = page[-1].id
    assert [len(p) for p in pages] == [20, 20, 5]
    assert [j.id for p in pages for j in p] == ids[::-1]  # newest first, no gaps, no repeats
    b_ids = [i for n, i in enumerate(ids) if n % 3 == 0]
    first = store.list(limit=10, model="b")
    rest = store.list(limit=10, model="b", after=first[-1].id)
    assert [j.id for j in first + rest] == b_ids[::-1]
    store.claim_next(["a"])
    assert [j.id for j in store.list(state="in_progress")] == [ids[1]]
    assert [j.id for j in store.list(limit=2, state=JobState.queued, model="a")] == [ids[44], ids[43]]
    assert store.list(limit=5, after=ids[0]) == []
    with pytest.raises(KeyError):
        store.list(after="vid_" + "f" * 24)
    with pytest.raises(ValueError):
        store.list(limit=0)
    with pytest.raises(ValueError):
        store.list(state="running")


def test_counts_and_queue_depth(store):
    for _ in range(3):
        store.create("a", {})
    store.create("b", {})
    j = store.claim_next(["a"])
    store.complete(j.id, f"{j.id}.mp4")
    store.claim_next(["a"])
    assert store.counts() == {JobState.queued: 2, JobState.in_progress: 1, JobState.completed: 1,
                              JobState.failed: 0, JobState.cancelled: 0}
    assert store.counts("b")[JobState.queued] == 1 and sum(store.counts("zzz").values()) == 0
    assert store.queue_depth() == 2 and store.queue_depth("a") == 1 and store.queue_depth("b") == 1


def test_wal_mode(store):
    store.create("m", {})
    assert store.journal_mode() == "wal"
    with sqlite3.connect(store.path) as other:  # persistent: every connection sees WAL
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Path(str(store.path) + "-wal").exists()


# -- concurrency --------------------------------------------------------------------------------------

def _claim_all(store: JobStore, out: list, barrier: threading.Barrier) -> None:
    barrier.wait()
    while (job := store.claim_next(["m"])) is not None:
        out.append(job.id)


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_concurrent_claims_each_job_once(tmp_path, shared):
    db, res = tmp_path / "jobs.sqlite", tmp_path / "results"
    main = JobStore(db, res)
    ids = {main.create("m", {"i": i}).id for i in range(50)}
    stores = [main if shared else JobStore(db, res) for _ in range(8)]
    outs = [[] for _ in stores]
    barrier = threading.Barrier(len(stores))
    threads = [threading.Thread(target=_claim_all, args=(s, o, barrier)) for s, o in zip(stores, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = [i for o in outs for i in o]
    assert len(claimed) == 50 and set(claimed) == ids
    assert all(j.attempts == 1 and j.state is JobState.in_progress for j in main.list(limit=100))
    for s in set(stores) | {main}:
        s.close()


def _claim_in_process(db: str, res: str, q) -> None:
    s = JobStore(db, res)
    got = []
    while (job := s.claim_next(["m"])) is not None:
        got.append(job.id)
    q.put(got)


def test_concurrent_claims_across_processes(tmp_path):
    db, res = str(tmp_path / "jobs.sqlite"), str(tmp_path / "results")
    main = JobStore(db, res)
    ids = {main.create("m", {"i": i}).id for i in range(40)}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(db, res, q)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    claimed = [i for g in got for i in g]
    assert len(claimed) == 40 and set(claimed) == ids
    main.close()


# -- restart ---------------------------------------------------------------------------------------------

def test_reopen_sees_every_job_and_recover(tmp_path):
    db, res = tmp_path / "jobs.sqlite", tmp_path / "results"
    s = JobStore(db, res)
    queued = s.create("m", {"n": 0})
    done = running(s, "done")
    s.new_result_path(done.id).write_bytes(b"video")
    done = s.complete(done.id, f"{done.id}.mp4", {"total_s": 3})
    was_running = running(s, "r")
    s.progress(was_running.id, 2, 4, "denoise")
    (res / f"{was_running.id}.mp4.part").write_bytes(b"half")
    tried_twice = running(s, "t")
    s.requeue(tried_twice.id)
    s.claim_next(["t"])  # attempts == 2
    cancel_pending = running(s, "c")
    s.cancel(cancel_pending.id)
    before = {j.id: j for j in s.list(limit=100)}
    s.close()

    s2 = JobStore(db, res)  # the restarted router
    assert {j.id: j for j in s2.list(limit=100)} == before
    assert s2.result_path(s2.get(done.id)).read_bytes() == b"video"
    assert s2.recover(max_attempts=2) == 3
    r = s2.get(was_running.id)
    assert r.state is JobState.queued and r.attempts == 1 and r.progress == 0 and r.started_at is None
    assert not (res / f"{was_running.id}.mp4.part").exists()
    t = s2.get(tried_twice.id)
    assert t.state is JobState.failed and "restart" in t.error and t.attempts == 2
    assert s2.get(cancel_pending.id).state is JobState.cancelled
    assert s2.get(queued.id) == before[queued.id] and s2.get(done.id) == done
    assert s2.recover() == 0
    # the requeued job runs again, in its original order
    assert s2.claim_next(["m", "r"]).id == queued.id
    again = s2.claim_next(["m", "r"])
    assert again.id == was_running.id and again.attempts == 2
    s2.close()


def test_recover_after_killed_process(tmp_path):
    """A real process claims a job and dies without closing anything; a new process recovers it."""
    db, res = tmp_path / "jobs.sqlite", tmp_path / "results"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from deployments.storage.jobs import JobStore
        s = JobStore({str(db)!r}, {str(res)!r})
        a = s.create("m", {{"prompt": "a"}})
        b = s.create("m", {{"prompt": "b"}})
        j = s.claim_next(["m"])
        s.progress(j.id, 1, 4, "denoise")
        print(a.id, b.id, flush=True)
        os._exit(9)  # no close, no cleanup
    """)
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr
    a_id, b_id = out.stdout.split()
    s = JobStore(db, res)
    assert s.get(a_id).state is JobState.in_progress and s.get(b_id).state is JobState.queued
    assert s.recover() == 1
    assert s.get(a_id).state is JobState.queued
    assert s.claim_next(["m"]).id == a_id
    s.close()


# -- retention ------------------------------------------------------------------------------------------

def test_purge_removes_old_finished_jobs_and_files(store):
    now = time.time()
    old_done = running(store)
    store.write_result(old_done.id, b"old")
    store.complete(old_done.id, f"{old_done.id}.mp4")
    old_failed = store.fail(running(store).id, "boom")
    new_done = running(store)
    store.write_result(new_done.id, b"new")
    store.complete(new_done.id, f"{new_done.id}.mp4")
    old_queued = store.create("other", {})  # never purged, however old
    old_running = running(store)
    set_finished_at(store, old_done.id, now - 101)
    set_finished_at(store, old_failed.id, now - 500)
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE jobs SET created_at = ?", (now - 10_000,))
    stray_old = store.results_dir / "vid_deadbeefdeadbeefdeadbeef.mp4.part"
    stray_new = store.results_dir / "vid_0123456789abcdef01234567.mp4.part"
    running_part = store.results_dir / f"{old_running.id}.mp4.part"
    for p in (stray_old, stray_new, running_part):
        p.write_bytes(b"x")
    os.utime(stray_old, (now - 1000, now - 1000))
    os.utime(running_part, (now - 1000, now - 1000))

    removed = store.purge(now=now)
    assert sorted(removed.jobs) == sorted([old_done.id, old_failed.id])
    assert sorted(removed.files) == sorted([f"{old_done.id}.mp4", stray_old.name])
    assert store.get(old_done.id) is None and store.get(old_failed.id) is None
    assert not (store.results_dir / f"{old_done.id}.mp4").exists() and not stray_old.exists()
    assert store.result_path(store.get(new_done.id)).read_bytes() == b"new"
    assert store.get(old_queued.id).state is JobState.queued
    assert store.get(old_running.id).state is JobState.in_progress and running_part.exists()
    assert stray_new.exists()
    assert store.purge(now=now).jobs == []
    later = store.purge(now=now + 200)  # everything finished is old by then
    assert later.jobs == [new_done.id] and f"{new_done.id}.mp4" in later.files


def test_delete(store):
    job = running(store)
    assert store.delete(job.id) is False  # running
    store.write_result(job.id, b"v")
    store.complete(job.id, f"{job.id}.mp4")
    assert store.delete(job.id) is True
    assert store.get(job.id) is None and not list(store.results_dir.iterdir())
    assert store.delete(job.id) is False


def test_blocks_are_counted_in_the_row(store):
    job = running(store)
    for i in range(3):
        assert store.write_block(job.id, i, f"block {i}".encode()).blocks == i + 1
    assert [p.name for p in sorted(store.results_dir.iterdir())] == [f"{job.id}.block{i:04d}.mp4" for i in range(3)]
    assert store.files.block_path(job.id, 2).read_bytes() == b"block 2"
    assert store.write_block(job.id, 1, b"again").blocks == 3  # a block written twice counts once
    assert store.write_block(job.id, 0, b"stale", attempt=job.attempts + 1) is None  # fenced
    assert store.requeue(job.id).blocks == 0 and not list(store.results_dir.iterdir())
    again = store.claim_next(["m"])
    assert again.blocks == 0
    store.complete(again.id, store.write_result(again.id, b"v"))
    assert store.write_block(again.id, 0, b"late") is None  # not running any more: nothing written
    assert not store.files.block_path(again.id, 0).exists()


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "jobs.sqlite"
    from deployments.storage.jobs import MIGRATIONS

    with sqlite3.connect(path) as c:  # a store written before block counts existed
        for stmt in filter(str.strip, MIGRATIONS[0].split(";")):
            c.execute(stmt)
        c.execute("PRAGMA user_version = 1")
        c.execute("INSERT INTO jobs (id, kind, model, request, state, created_at) VALUES "
                  "('vid_0123456789abcdef01234567', 'fragment', 'm', '{}', 'completed', 1.0)")
    s = JobStore(path, tmp_path / "results")
    assert s.get("vid_0123456789abcdef01234567").blocks == 0
    assert s._read("PRAGMA user_version")[0][0] == len(MIGRATIONS) == 2
    s.close()
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="downgrade"):
        JobStore(path, tmp_path / "results")
