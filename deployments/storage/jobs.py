"""Durable job store for the Serve router: SQLite (WAL) rows + result files on disk with retention.

One `JobStore` is opened by the process that owns the jobs (the router). It is safe to share between
threads (one connection behind a lock) and between processes or JobStore instances on the same file
(every read-modify-write runs in a `BEGIN IMMEDIATE` transaction, with a busy timeout). A restarted
process that opens the same file sees every job; call `recover()` once at start-up to requeue jobs the
dead process left `in_progress`.

States and transitions (anything else is ignored: the method returns None and logs, state is untouched)::

    create ─▶ queued ──claim_next──▶ in_progress ──complete──▶ completed
                │  ▲                    │  │  └────fail──────▶ failed
                │  └──requeue/recover───┘  └─finish_cancelled▶ cancelled
                ├──cancel──────────────────────────────────────▶ cancelled
                └──fail (e.g. the model went away)─────────────▶ failed

Semantics decisions:
- `cancel()` of a queued job cancels it at once; of a running job it only sets `cancel_requested`, and the
  worker ends it with `finish_cancelled()`. Of a terminal job it changes nothing (returns the job as is).
- Cancel wins: once `cancel_requested` is set, the job can only end `cancelled`. A worker that still calls
  `complete()`, `fail()` or `requeue()` ends it `cancelled` instead (the result file, if any, is deleted)
  and gets the cancelled Job back — check `job.state`. A job already `cancelled` (or any terminal job)
  is never changed again: late `complete()`/`fail()`/`progress()` calls return None.
- Fencing: `progress`/`complete`/`fail`/`requeue`/`finish_cancelled` take an optional `attempt`
  (the `attempts` value of the Job returned by `claim_next`). If the job was requeued and claimed again
  since, the stale worker's call is ignored.
- `progress` is `step * 100 // total`, capped at 99 until `complete()` sets 100; a requeue resets it to 0.
- Times are epoch seconds (`time.time()`); list order is insertion order (a monotonic row number), not
  `created_at`, so a clock step cannot reorder pages.

Result files live in `results_dir`; `Job.result` is a file name relative to it. Writers must never
expose half-written files: write `<id>.mp4.part` and rename (`model.video.write_mp4` already does this
for the path `new_result_path(id)`; `atomic_result(id)` / `write_result(id, data)` do it for others).
`purge()` deletes terminal jobs finished more than `retention_s` ago (rows and files) and stray files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..states import TERMINAL_STATES, JobKind, JobState

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JOB_ID_PREFIX = "vid_"
JOB_ID_RE = re.compile(r"^vid_[0-9a-f]{24}$")
RESULT_SUFFIX = ".mp4"
PART_SUFFIX = ".part"
DEFAULT_RETENTION_S = 7 * 24 * 3600




class Job(BaseModel):
    """One job as stored; `job.model_dump(mode="json")` is plain JSON."""

    id: str
    kind: JobKind = JobKind.video
    model: str
    session_id: str | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    state: JobState = JobState.queued
    progress: int = Field(0, ge=0, le=100)
    step: int = 0
    total: int = 0
    stage: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    result: str | None = None
    cancel_requested: bool = False
    attempts: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass
class PurgeResult:
    """What `purge()` removed: job ids (rows) and file names under results_dir."""

    jobs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def new_job_id() -> str:
    return JOB_ID_PREFIX + secrets.token_hex(12)


_COLUMNS = ("id", "kind", "model", "session_id", "request", "state", "progress", "step", "total", "stage",
            "created_at", "started_at", "finished_at", "timings", "error", "result", "cancel_requested",
            "attempts")
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM jobs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    session_id TEXT,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    stage TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    result TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state_model ON jobs (state, model, seq);
CREATE INDEX IF NOT EXISTS jobs_model_seq ON jobs (model, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
"""


def _row_to_job(row: tuple) -> Job:
    d = dict(zip(_COLUMNS, row))
    d["request"] = json.loads(d["request"])
    d["timings"] = json.loads(d["timings"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job.model_validate(d)


class JobStore:
    """Jobs in SQLite at `path` (WAL mode), their result files under `results_dir`.

    Transition methods return the Job after the call, or None when the transition does not apply
    (unknown id, wrong state, stale `attempt`); see the module docstring for the rules.
    """

    def __init__(self, path: str | os.PathLike, results_dir: str | os.PathLike,
                 retention_s: float = DEFAULT_RETENTION_S, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.results_dir = Path(results_dir)
        self.retention_s = float(retention_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._doomed: list[str] = []  # result files to delete once the current transaction commits
        # Autocommit mode (isolation_level=None): transactions are explicit, see _write().
        self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("JobStore %s: journal_mode is %r, not WAL (filesystem without shared memory?)",
                        self.path, mode)
        self._conn.execute("PRAGMA synchronous = FULL")  # an accepted job survives a power cut
        with self._write() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has job schema version {version}; this wanserve knows "
                                   f"up to {SCHEMA_VERSION} (downgrade?)")
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                c.execute(stmt)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the file's write lock up front, so a
        read-then-update is atomic across threads, JobStore instances and processes."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._doomed = []
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._doomed = []
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            # Files go only after the rows that point at them are gone (a failed commit keeps both).
            doomed, self._doomed = self._doomed, []
            self._unlink(doomed)

    def _read(self, sql: str, args: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    @staticmethod
    def _get(c: sqlite3.Connection, job_id: str) -> Job | None:
        row = c.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    @staticmethod
    def _set(c: sqlite3.Connection, job_id: str, **values: Any) -> None:
        for k in ("request", "timings"):
            if k in values:
                values[k] = json.dumps(values[k])
        for k, v in values.items():
            if isinstance(v, JobState):
                values[k] = v.value
            elif isinstance(v, bool):
                values[k] = int(v)
        sets = ", ".join(f"{k} = ?" for k in values)
        c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    def _ignored(self, op: str, job_id: str, job: Job | None, attempt: int | None = None) -> None:
        level = logging.DEBUG if op == "progress" else logging.WARNING  # late progress is routine
        if job is None:
            log.log(level, "JobStore.%s(%s) ignored: no such job", op, job_id)
        elif self._stale(job, attempt):
            log.log(level, "JobStore.%s(%s) ignored: stale attempt %s (the job is at attempt %s)", op, job_id,
                    attempt, job.attempts)
        else:
            log.log(level, "JobStore.%s(%s) ignored: job is %s%s", op, job_id, job.state,
                    " (cancel requested)" if job.cancel_requested else "")

    def _stale(self, job: Job, attempt: int | None) -> bool:
        return attempt is not None and attempt != job.attempts

    def _end_cancelled(self, c: sqlite3.Connection, job: Job, now: float, drop_file: str | None = None) -> Job:
        """In-progress job with cancel requested -> cancelled; removes the job's result files."""
        self._set(c, job.id, state=JobState.cancelled, finished_at=now, result=None)
        self._doomed += self._job_files(job.id, extra=drop_file)
        return self._get(c, job.id)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- create / read ----------------------------------------------------------------------------

    def create(self, model: str, request: dict, kind: JobKind | str = JobKind.video,
               session_id: str | None = None) -> Job:
        """A new queued job; `request` must be JSON-serialisable (it is stored as JSON)."""
        if kind not in {k.value for k in JobKind}:
            raise ValueError(f"kind must be 'video' or 'fragment', got {kind!r}")
        kind = JobKind(kind)
        job = Job(id=new_job_id(), kind=kind, model=model, session_id=session_id, request=request,
                  created_at=time.time())
        with self._write() as c:
            c.execute("INSERT INTO jobs (id, kind, model, session_id, request, state, created_at, timings) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (job.id, job.kind.value, job.model, job.session_id, json.dumps(request), job.state.value,
                       job.created_at, "{}"))
        return job

    def get(self, job_id: str) -> Job | None:
        rows = self._read(_SELECT + " WHERE id = ?", (job_id,))
        return _row_to_job(rows[0]) if rows else None

    def list(self, limit: int = 20, after: str | None = None, model: str | None = None,
             state: JobState | str | None = None) -> list[Job]:
        """Newest first. Next page: `after=<id of the last job of this page>`; ask for limit+1 to learn
        whether there is a next page. An `after` id that does not exist (never did, or purged) raises
        KeyError."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        where, args = [], []
        if after is not None:
            rows = self._read("SELECT seq FROM jobs WHERE id = ?", (after,))
            if not rows:
                raise KeyError(f"unknown cursor job id {after!r}")
            where.append("seq < ?")
            args.append(rows[0][0])
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if state is not None:
            where.append("state = ?")
            args.append(JobState(state).value)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        return [_row_to_job(r) for r in self._read(sql, (*args, int(limit)))]

    def counts(self, model: str | None = None) -> dict[JobState, int]:
        """Number of jobs in every state (all five keys, zeros included)."""
        sql, args = "SELECT state, COUNT(*) FROM jobs", ()
        if model is not None:
            sql, args = sql + " WHERE model = ?", (model,)
        out = {s: 0 for s in JobState}
        for state, n in self._read(sql + " GROUP BY state", args):
            out[JobState(state)] = n
        return out

    def queued_sessions(self, model: str | None = None) -> set[str]:
        """Session ids that have queued jobs."""
        sql, args = "SELECT DISTINCT session_id FROM jobs WHERE state = 'queued' AND session_id IS NOT NULL", ()
        if model is not None:
            sql, args = sql + " AND model = ?", (model,)
        return {r[0] for r in self._read(sql, args)}

    def session_jobs(self, session_id: str) -> list[Job]:
        """Every job of a session, oldest first."""
        return [_row_to_job(r) for r in self._read(_SELECT + " WHERE session_id = ? ORDER BY seq", (session_id,))]

    def queue_depth(self, model: str | None = None) -> int:
        """Jobs waiting (state queued; running ones not included)."""
        sql, args = "SELECT COUNT(*) FROM jobs WHERE state = 'queued'", ()
        if model is not None:
            sql, args = sql + " AND model = ?", (model,)
        return self._read(sql, args)[0][0]

    # -- worker side --------------------------------------------------------------------------------

    def claim_next(self, models: Iterable[str], skip_sessions: Iterable[str] = ()) -> Job | None:
        """Atomically move the oldest queued job of `models` to in_progress (attempts + 1).

        skip_sessions: session ids whose jobs must wait (their session is busy elsewhere); the oldest job
        of any other session, or of none, is claimed instead."""
        models = [models] if isinstance(models, str) else list(models)
        if not models:
            return None
        skip = sorted(set(skip_sessions))
        marks = ", ".join("?" * len(models))
        where = f"state = 'queued' AND model IN ({marks})"
        if skip:
            where += f" AND (session_id IS NULL OR session_id NOT IN ({', '.join('?' * len(skip))}))"
        with self._write() as c:
            row = c.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY seq LIMIT 1", [*models, *skip]).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state = 'in_progress', attempts = attempts + 1, started_at = ?, "
                      "progress = 0, step = 0, total = 0, stage = NULL WHERE id = ?", (time.time(), row[0]))
            return self._get(c, row[0])

    def progress(self, job_id: str, step: int, total: int, stage: str | None = None,
                 attempt: int | None = None, percent: int | None = None) -> Job | None:
        """Record step k of n (and the stage name) of a running job. `percent` (capped at 99) is the
        job's overall progress when the caller weighs stages itself; default step * 100 // total."""
        with self._write() as c:
            job = self._get(c, job_id)
            if job is None or job.state is not JobState.in_progress or self._stale(job, attempt):
                self._ignored("progress", job_id, job, attempt)
                return None
            pct = job.progress
            if percent is not None:
                pct = max(0, min(99, int(percent)))
            elif total > 0:
                pct = max(0, min(99, int(step) * 100 // int(total)))
            self._set(c, job_id, step=int(step), total=int(total), stage=stage, progress=pct)
            return self._get(c, job_id)

    def complete(self, job_id: str, result_file: str | os.PathLike, timings: dict | None = None,
                 attempt: int | None = None) -> Job | None:
        """in_progress -> completed with its result file (name relative to results_dir, or a path inside
        it). If cancel was requested meanwhile, the job ends cancelled instead (file deleted)."""
        name = self._relative_result(result_file)
        with self._write() as c:
            job = self._get(c, job_id)
            if job is None or job.state is not JobState.in_progress or self._stale(job, attempt):
                self._ignored("complete", job_id, job, attempt)
                return None
            now = time.time()
            if job.cancel_requested:
                log.info("JobStore.complete(%s): cancel was requested, ending it cancelled", job_id)
                return self._end_cancelled(c, job, now, drop_file=name)
            self._set(c, job_id, state=JobState.completed, finished_at=now, result=name,
                      timings=dict(timings or {}), progress=100, error=None)
            return self._get(c, job_id)

    def fail(self, job_id: str, error: str, timings: dict | None = None,
             attempt: int | None = None) -> Job | None:
        """queued or in_progress -> failed with a reason (cancel requested: -> cancelled)."""
        with self._write() as c:
            job = self._get(c, job_id)
            if (job is None or job.state not in (JobState.queued, JobState.in_progress)
                    or self._stale(job, attempt)):
                self._ignored("fail", job_id, job, attempt)
                return None
            now = time.time()
            if job.cancel_requested:
                return self._end_cancelled(c, job, now)
            values: dict[str, Any] = {"state": JobState.failed, "finished_at": now, "error": str(error)}
            if timings:
                values["timings"] = dict(timings)
            self._set(c, job_id, **values)
            self._doomed += self._job_files(job_id, results=False)
            return self._get(c, job_id)

    def cancel(self, job_id: str) -> Job | None:
        """queued -> cancelled now; in_progress -> cancel_requested (the worker ends it);
        terminal -> unchanged. Returns the job after the call, None if the id is unknown."""
        with self._write() as c:
            job = self._get(c, job_id)
            if job is None:
                return None
            if job.state is JobState.queued:
                self._set(c, job_id, state=JobState.cancelled, cancel_requested=True, finished_at=time.time())
            elif job.state is JobState.in_progress and not job.cancel_requested:
                self._set(c, job_id, cancel_requested=True)
            else:
                return job
            return self._get(c, job_id)

    def finish_cancelled(self, job_id: str, attempt: int | None = None) -> Job | None:
        """in_progress -> cancelled (the worker stopped it)."""
        with self._write() as c:
            job = self._get(c, job_id)
            if job is None or job.state is not JobState.in_progress or self._stale(job, attempt):
                self._ignored("finish_cancelled", job_id, job, attempt)
                return None
            return self._end_cancelled(c, job, time.time())

    def requeue(self, job_id: str, attempt: int | None = None) -> Job | None:
        """in_progress -> queued for a retry (keeps its place: the oldest job is claimed first).
        If cancel was requested, the job ends cancelled instead."""
        with self._write() as c:
            job = self._get(c, job_id)
            if job is None or job.state is not JobState.in_progress or self._stale(job, attempt):
                self._ignored("requeue", job_id, job, attempt)
                return None
            if job.cancel_requested:
                return self._end_cancelled(c, job, time.time())
            self._set(c, job_id, state=JobState.queued, started_at=None, progress=0, step=0, total=0, stage=None)
            self._doomed += self._job_files(job_id)
            return self._get(c, job_id)

    def recover(self, max_attempts: int = 2) -> int:
        """At start-up, before any worker runs: every job left in_progress by a dead process is
        requeued, or failed if it has already been tried `max_attempts` times, or cancelled if cancel
        was requested. Returns how many in_progress jobs were resolved this way."""
        with self._write() as c:
            rows = c.execute(_SELECT + " WHERE state = 'in_progress' ORDER BY seq").fetchall()
            now = time.time()
            for job in map(_row_to_job, rows):
                if job.cancel_requested:
                    self._end_cancelled(c, job, now)
                elif job.attempts >= max_attempts:
                    self._set(c, job.id, state=JobState.failed, finished_at=now,
                              error=f"interrupted {job.attempts} time(s) by a server restart while running; "
                                    f"not retried again (max_attempts={max_attempts})")
                    self._doomed += self._job_files(job.id, results=False)
                else:
                    self._set(c, job.id, state=JobState.queued, started_at=None, progress=0, step=0, total=0,
                              stage=None)
                    self._doomed += self._job_files(job.id)
        if rows:
            log.info("JobStore.recover: %d job(s) were in progress", len(rows))
        return len(rows)

    def delete(self, job_id: str) -> bool:
        """Remove a terminal job (row and files) now; False if unknown or not terminal."""
        with self._write() as c:
            job = self._get(c, job_id)
            if job is None or not job.terminal:
                self._ignored("delete", job_id, job)
                return False
            c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._doomed += self._job_files(job_id, extra=job.result)
            return True

    # -- result files ------------------------------------------------------------------------------

    def new_result_path(self, job_id: str) -> Path:
        """Where the job's mp4 goes: `<results_dir>/<id>.mp4`. Write `<that>.part` and rename
        (`model.video.write_mp4` does; or use `atomic_result` / `write_result`)."""
        if not JOB_ID_RE.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.results_dir / f"{job_id}{RESULT_SUFFIX}"

    def result_path(self, job: Job | str) -> Path:
        """Absolute path of a job's result file (it may be gone if deleted by hand); ValueError if the
        job has no result."""
        if isinstance(job, str):
            found = self.get(job)
            if found is None:
                raise KeyError(job)
            job = found
        if not job.result:
            raise ValueError(f"job {job.id} has no result (state {job.state})")
        return self.results_dir / self._relative_result(job.result)

    @contextlib.contextmanager
    def atomic_result(self, job_id: str) -> Iterator[Path]:
        """`with store.atomic_result(id) as part: <write part>` -> renamed to new_result_path(id) on
        success, removed on error. Yields the `.part` path."""
        final = self.new_result_path(job_id)
        part = final.with_name(final.name + PART_SUFFIX)
        try:
            yield part
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def write_result(self, job_id: str, data: bytes) -> str:
        """Write bytes atomically as the job's result; returns the file name for `complete()`."""
        with self.atomic_result(job_id) as part, open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return self.new_result_path(job_id).name

    def _relative_result(self, result_file: str | os.PathLike) -> str:
        p = Path(result_file)
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(self.results_dir.resolve())
            except ValueError:
                raise ValueError(f"result file {result_file} is not inside {self.results_dir}") from None
        if not p.parts or ".." in p.parts or p.is_absolute():
            raise ValueError(f"bad result file name {str(result_file)!r}")
        return p.as_posix()

    def _job_files(self, job_id: str, results: bool = True, extra: str | None = None) -> list[str]:
        """Names of the job's files: `<id>.*` (with results=False only `.part` leftovers) and `extra`."""
        names = set()
        if JOB_ID_RE.match(job_id):
            for p in self.results_dir.glob(f"{job_id}.*"):
                if results or p.name.endswith(PART_SUFFIX):
                    names.add(p.name)
        if extra:
            with contextlib.suppress(ValueError):
                names.add(self._relative_result(extra))
        return sorted(names)

    def _unlink(self, names: Iterable[str]) -> list[str]:
        """Delete files under results_dir; returns the names actually deleted."""
        removed = []
        for name in names:
            try:
                (self.results_dir / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("JobStore: could not delete %s: %s", self.results_dir / name, e)
        return removed

    # -- retention ---------------------------------------------------------------------------------

    def purge(self, now: float | None = None) -> PurgeResult:
        """Delete terminal jobs finished more than retention_s before `now` (rows and result files), and
        files in results_dir older than that which belong to no remaining job. Returns what went."""
        now = time.time() if now is None else float(now)
        cutoff = now - self.retention_s
        out, doomed = PurgeResult(), []
        with self._write() as c:
            rows = c.execute(_SELECT + " WHERE finished_at IS NOT NULL AND finished_at < ? "
                             "AND state IN ('completed', 'failed', 'cancelled') ORDER BY seq", (cutoff,)).fetchall()
            for job in map(_row_to_job, rows):
                c.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
                out.jobs.append(job.id)
                doomed += self._job_files(job.id, extra=job.result)
            known = {r[0] for r in c.execute("SELECT id FROM jobs")}
            referenced = {r[0] for r in c.execute("SELECT result FROM jobs WHERE result IS NOT NULL")}
            for p in self.results_dir.iterdir():  # strays: files of no job (crashes, deleted rows)
                if p.name in doomed or not p.is_file() or p.name in referenced or p.name.split(".", 1)[0] in known:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if p.stat().st_mtime < cutoff:
                        doomed.append(p.name)
        out.files = self._unlink(doomed)  # after the commit
        if out.jobs or out.files:
            log.info("JobStore.purge: %d job(s), %d file(s)", len(out.jobs), len(out.files))
        return out

    def journal_mode(self) -> str:
        return self._read("PRAGMA journal_mode")[0][0]
