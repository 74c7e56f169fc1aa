"""Durable job store of the router: SQLite rows (storage/sqlite.py's policy) + result files with retention.

A job moves queued -> in_progress -> completed | failed | cancelled (a replica's death requeues it; a
restarted router `recover()`s jobs the dead one left running). Transition methods return the Job after the
call, or None when the transition does not apply (unknown id, wrong state, stale `attempt`: fencing against
a worker whose job was requeued and claimed again). Cancel wins: once requested, a job can only end
cancelled. The state diagram and every rule: ARCHITECTURE.md, "Job store". Result files live in
`results_dir` (`<id>.mp4`, CausVid blocks `<id>.block<k>.mp4`), always written through model.files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from model.files import atomic_path

from ..states import TERMINAL_STATES, JobKind, JobState
from .results import OnError, ResultFiles
from .sqlite import Database

log = logging.getLogger(__name__)

JOB_ID_PREFIX = "vid_"
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
    blocks: int = 0  # CausVid fragments: decoded blocks written so far (<id>.block<k>.mp4)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass
class PurgeResult:
    """What `purge()` removed: job ids (rows) and file names under results_dir."""

    jobs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    errors: int = 0  # items that failed (reported to on_error) and are tried again next round


def new_job_id() -> str:
    return JOB_ID_PREFIX + secrets.token_hex(12)


_COLUMNS = ("id", "kind", "model", "session_id", "request", "state", "progress", "step", "total", "stage",
            "created_at", "started_at", "finished_at", "timings", "error", "result", "cancel_requested",
            "attempts", "blocks")
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM jobs"

_SCHEMA_V1 = """
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
MIGRATIONS = (_SCHEMA_V1, "ALTER TABLE jobs ADD COLUMN blocks INTEGER NOT NULL DEFAULT 0")


def _row_to_job(row: tuple) -> Job:
    d = dict(zip(_COLUMNS, row))
    d["request"] = json.loads(d["request"])
    d["timings"] = json.loads(d["timings"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job.model_validate(d)


class JobStore:
    """Jobs in SQLite at `path`, their result files under `results_dir` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, results_dir: str | os.PathLike,
                 retention_s: float = DEFAULT_RETENTION_S, busy_timeout_s: float = 30.0):
        self.files = ResultFiles(results_dir)
        self.results_dir = self.files.dir
        self.retention_s = float(retention_s)
        self._db = Database(path, MIGRATIONS, "job", busy_timeout_s)
        self.path = self._db.path
        self._doomed: list[str] = []  # result files to delete once the current transaction commits

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; the result files it dooms go only after the rows that point at them (a
        failed commit keeps both)."""
        with self._db.lock:
            self._doomed = []
            try:
                with self._db.write() as c:
                    yield c
            except BaseException:
                self._doomed = []
                raise
            doomed, self._doomed = self._doomed, []
            self.files.unlink(doomed)

    def _read(self, sql: str, args: Iterable = ()) -> list[tuple]:
        return self._db.read(sql, args)

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
        self._doomed += self.files.of_job(job.id, extra=drop_file)
        return self._get(c, job.id)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
                      "progress = 0, step = 0, total = 0, stage = NULL, blocks = 0 WHERE id = ?",
                      (time.time(), row[0]))
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
        name = self.files.relative(result_file)
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
            self._doomed += self.files.of_job(job_id, results=False)
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
            self._set(c, job_id, state=JobState.queued, started_at=None, progress=0, step=0, total=0, stage=None,
                      blocks=0)
            self._doomed += self.files.of_job(job_id)
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
                    self._doomed += self.files.of_job(job.id, results=False)
                else:
                    self._set(c, job.id, state=JobState.queued, started_at=None, progress=0, step=0, total=0,
                              stage=None, blocks=0)
                    self._doomed += self.files.of_job(job.id)
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
            self._doomed += self.files.of_job(job_id, extra=job.result)
            return True

    def new_result_path(self, job_id: str) -> Path:
        return self.files.result_path(job_id)

    def atomic_result(self, job_id: str):
        return self.files.atomic(job_id)

    def write_result(self, job_id: str, data: bytes) -> str:
        return self.files.write(job_id, data)

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
        return self.results_dir / self.files.relative(job.result)

    def write_block(self, job_id: str, index: int, data: bytes, attempt: int | None = None) -> Job | None:
        """Block `index` of a running fragment job, written atomically; the job's block count follows (so a
        job's view needs no directory listing). None (nothing written) if the job is not running."""
        job = self.get(job_id)
        if job is None or job.state is not JobState.in_progress or self._stale(job, attempt):
            self._ignored("write_block", job_id, job, attempt)
            return None
        with atomic_path(self.files.block_path(job_id, index)) as part:
            part.write_bytes(data)
        with self._write() as c:  # fenced again: the job may have been requeued while the file was written
            c.execute("UPDATE jobs SET blocks = MAX(blocks, ?) WHERE id = ? AND state = 'in_progress' AND attempts = ?",
                      (int(index) + 1, job_id, job.attempts if attempt is None else attempt))
            return self._get(c, job_id)

    def purge(self, now: float | None = None, on_error: OnError | None = None) -> PurgeResult:
        """Delete terminal jobs finished more than retention_s before `now` (rows and result files), and
        files in results_dir older than that which belong to no remaining job. Each job and each stray
        file is its own item: with `on_error(item, exc)` a failing item is reported and the round goes on
        (it is tried again next round); without, the first failure raises."""
        now = time.time() if now is None else float(now)
        cutoff = now - self.retention_s
        out = PurgeResult()

        def failed(item: str, e: BaseException) -> None:
            if on_error is None:
                raise e
            out.errors += 1
            on_error(item, e)

        expired = [r[0] for r in self._read("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? "
                                            "AND state IN ('completed', 'failed', 'cancelled') ORDER BY seq",
                                            (cutoff,))]
        for job_id in expired:
            try:
                with self._write() as c:
                    job = self._get(c, job_id)
                    if job is None or not job.terminal:
                        continue
                    c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                    files = self.files.of_job(job_id, extra=job.result)
                out.jobs.append(job_id)
                out.files += self.files.unlink(files, failed)
            except Exception as e:  # this job only: the others are still purged this round
                failed(job_id, e)
        known = {r[0] for r in self._read("SELECT id FROM jobs")}
        referenced = {r[0] for r in self._read("SELECT result FROM jobs WHERE result IS NOT NULL")}
        for p in sorted(self.results_dir.iterdir()):  # strays: files of no job (crashes, deleted rows)
            if not p.is_file() or p.name in referenced or p.name.split(".", 1)[0] in known:
                continue
            try:
                if p.stat().st_mtime < cutoff:
                    out.files += self.files.unlink([p.name], failed)
            except FileNotFoundError:
                continue
            except OSError as e:
                failed(p.name, e)
        if out.jobs or out.files:
            log.info("JobStore.purge: %d job(s), %d file(s)", len(out.jobs), len(out.files))
        return out

    def journal_mode(self) -> str:
        return self._db.journal_mode()
