"""The client logic written once: one Job, one Session, and the loops behind them, over any transport.

A transport (http.py: requests / aiohttp; handle.py: a Serve handle) is a subclass of `SyncCore` or
`AsyncCore` that implements one method, `_op(name, *args)`: the router's handle API (`submit`, `get`,
`cancel`, `content`, `block`, `list`, `models`, `open_session`, `fragment`, `session`, `session_video`,
`close_session`), plain dicts and bytes in and out, every refusal a `WanError`. The core turns those into
the public calls (`generate`, `job`, `jobs`, `models`, `session`) and the Job / Session operations.
`Job` and `Session` hold their client and delegate each method to `client._<op>(self, ...)`, which updates
`.data`: over a SyncCore the methods return values, over an AsyncCore awaitables (and `blocks()` an async
iterator). The loops (wait, blocks, the 429 retry) are written twice, blocking and asyncio, as mirrors of
each other; what is not I/O (deadlines, the progress bar, terminal states, errors) is shared below.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from model.files import write_atomic

from ..states import TERMINAL_STATES, JobState

LONG_OPS = frozenset({"open_session", "session_video"})  # may take minutes: at least LONG_TIMEOUT_S
LONG_TIMEOUT_S = 600.0


class WanError(Exception):
    """The server refused or failed a call; `status` is the HTTP status, `message` says what to fix."""

    def __init__(self, status: int, message: str, code: str | None = None, retry_after: float | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


class JobFailed(WanError):
    """The job ended failed; `job` is its last state."""

    def __init__(self, job: dict):
        err = job.get("error") or {}
        super().__init__(500, f"job {job['id']} failed: {err.get('message')}", err.get("code"))
        self.job = job


class JobCancelled(WanError):
    """The job was cancelled; `job` is its last state."""

    def __init__(self, job: dict):
        super().__init__(409, f"job {job['id']} was cancelled", "cancelled")
        self.job = job


# ---- what is not I/O, shared by both cores -----------------------------------------------------------------------

def request_body(prompt: str, model: str | None, params: dict) -> dict:
    """The JSON fields of a submit / open_session call: the prompt, the model if named, the params given."""
    body = {"prompt": prompt, **({"model": model} if model else {})}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def parse_retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is not used by wanserve: None)."""
    return float(value) if value and value.replace(".", "", 1).isdigit() else None


def op_timeout(op: str, timeout: float) -> float:
    return max(timeout, LONG_TIMEOUT_S) if op in LONG_OPS else timeout


def is_terminal(job: dict) -> bool:
    return JobState(job["status"]) in TERMINAL_STATES


def ended(job: dict) -> dict:
    """A terminal job as the caller gets it: completed returns, failed / cancelled raise."""
    if job["status"] == JobState.failed:
        raise JobFailed(job)
    if job["status"] == JobState.cancelled:
        raise JobCancelled(job)
    return job


def queue_pause(err: WanError, deadline: float) -> float | None:
    """Seconds to wait before submitting again after err, or None to raise it: only a full queue (429) is
    retried, honouring its Retry-After, until the deadline."""
    left = deadline - time.monotonic()
    if err.status != 429 or left <= 0:
        return None
    return min(err.retry_after or 1.0, max(0.1, left))


def write_file(path: str | Path, data: bytes) -> Path:
    """A downloaded video, written atomically (model/files.py: never half a file at `path`)."""
    return write_atomic(path, data)


class Deadline:
    """TimeoutError once `timeout` seconds have passed (never with timeout=None)."""

    def __init__(self, job_id: str, timeout: float | None):
        self.job_id, self.timeout = job_id, timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    def check(self, job: dict) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise TimeoutError(f"job {self.job_id} still {job['status']} after {self.timeout} s")


class Bar:
    """A tqdm progress bar of a job's percent (no-op when progress=False)."""

    def __init__(self, enabled: bool, job_id: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100, desc=job_id[:16], unit="%", leave=True)

    def update(self, job: dict) -> None:
        if self.bar is not None:
            self.bar.n = job["progress"]
            self.bar.set_postfix_str(f"{job['status']} {job.get('stage') or ''} {job['step']}/{job['total_steps']}")
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the objects callers hold ------------------------------------------------------------------------------------

class Job:
    """A video job (a CausVid fragment too). Over an async client every method returns an awaitable."""

    def __init__(self, client: SyncCore | AsyncCore, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.data['status']}, {self.data['progress']}%)"

    def status(self):
        """The job's current state (also kept in .data)."""
        return self.client._status(self)

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.25):
        """Until the job ends; returns it completed, raises JobFailed / JobCancelled / TimeoutError."""
        return self.client._wait(self, progress, timeout, poll)

    def content(self, timeout: float | None = None):
        """The mp4 (waits for the job first if it has not completed)."""
        return self.client._content(self, timeout)

    def save(self, path: str | Path, timeout: float | None = None):
        """The mp4 written to path (its folders made); returns the Path."""
        return self.client._save(self, path, timeout)

    def cancel(self):
        return self.client._cancel(self)

    def blocks(self, timeout: float | None = None, poll: float = 0.1):
        """CausVid fragment jobs: (index, mp4 bytes) of each decoded block, once each and in order, as soon as
        it exists, until the job ends; then JobFailed / JobCancelled if it did not complete."""
        return self.client._blocks(self, timeout, poll)


class Session:
    """A CausVid session: `with` (sync client) or `async with` (async client) closes it at the end."""

    def __init__(self, client: SyncCore | AsyncCore, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    def __repr__(self) -> str:
        return f"Session({self.id})"

    def __enter__(self) -> Session:
        if self.client.is_async:
            raise TypeError("a Session of an async client is closed with `async with`, not `with`")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        if not self.client.is_async:
            raise TypeError("a Session of a sync client is closed with `with`, not `async with`")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def next_fragment(self, prompt: str | None = None):
        """Queue the next fragment (prompt=None: the same prompt continues); returns its Job."""
        return self.client._next_fragment(self, prompt)

    def info(self):
        return self.client._info(self)

    def video(self, path: str | Path | None = None):
        """The whole video so far (mp4 bytes); written to path if given (returns the Path)."""
        return self.client._video(self, path)

    def close(self):
        return self.client._close(self)


# ---- the blocking core ---------------------------------------------------------------------------------------------

class SyncCore:
    """Base of the blocking clients (WanClient, HandleClient): subclasses implement `_op`."""

    is_async = False

    def _op(self, op: str, *args) -> Any:
        raise NotImplementedError

    def generate(self, prompt: str, model: str | None = None, image: str | Path | bytes | None = None,
                 wait_for_queue: float = 0.0, **params) -> Job:
        """Queue a video. image: an I2V first frame. params: size ("832x480"), num_frames, seed,
        negative_prompt, loras, num_fragments. wait_for_queue: seconds to keep retrying while the queue is
        full (429), honouring Retry-After."""
        body, deadline = request_body(prompt, model, params), time.monotonic() + wait_for_queue
        while True:
            try:
                return Job(self, self._op("submit", body, image))
            except WanError as e:
                pause = queue_pause(e, deadline)
                if pause is None:
                    raise
            time.sleep(pause)

    def job(self, job_id: str) -> Job:
        return Job(self, self._op("get", job_id))

    def jobs(self, limit: int = 20, after: str | None = None) -> dict:
        """A page of jobs, newest first: {"data": [...], "has_more": bool}."""
        return self._op("list", limit, after)

    def models(self) -> dict:
        return self._op("models")

    def session(self, model: str | None = None, prompt: str = "", seed: int | None = None,
                size: str | None = None) -> Session:
        return Session(self, self._op("open_session", request_body(prompt, model, {"seed": seed, "size": size})))

    # Job and Session operations (their methods call these)

    def _status(self, job: Job) -> dict:
        job.data = self._op("get", job.id)
        return job.data

    def _wait(self, job: Job, progress: bool, timeout: float | None, poll: float) -> dict:
        deadline, bar = Deadline(job.id, timeout), Bar(progress, job.id)
        try:
            while not is_terminal(self._status(job)):
                bar.update(job.data)
                deadline.check(job.data)
                time.sleep(poll)
            bar.update(job.data)
        finally:
            bar.close()
        return ended(job.data)

    def _content(self, job: Job, timeout: float | None) -> bytes:
        if job.data["status"] != JobState.completed:
            self._wait(job, False, timeout, 0.25)
        return self._op("content", job.id)

    def _save(self, job: Job, path: str | Path, timeout: float | None) -> Path:
        return write_file(path, self._content(job, timeout))

    def _cancel(self, job: Job) -> dict:
        job.data = self._op("cancel", job.id)
        return job.data

    def _blocks(self, job: Job, timeout: float | None, poll: float) -> Iterator[tuple[int, bytes]]:
        deadline, sent = Deadline(job.id, timeout), 0
        while True:
            data = self._status(job)
            while sent < data["blocks"]:
                yield sent, self._op("block", job.id, sent)
                sent += 1
            if is_terminal(data):
                ended(data)
                return
            deadline.check(data)
            time.sleep(poll)

    def _next_fragment(self, session: Session, prompt: str | None) -> Job:
        return Job(self, self._op("fragment", session.id, prompt))

    def _info(self, session: Session) -> dict:
        session.data = self._op("session", session.id)
        return session.data

    def _video(self, session: Session, path: str | Path | None) -> bytes | Path:
        data = self._op("session_video", session.id)
        return data if path is None else write_file(path, data)

    def _close(self, session: Session) -> dict:
        return self._op("close_session", session.id)


# ---- the asyncio core (a mirror of SyncCore: the same steps, awaited) ---------------------------------------------

class AsyncCore:
    """Base of the asyncio clients (AsyncWanClient, AsyncHandleClient): subclasses implement `async _op`."""

    is_async = True

    async def _op(self, op: str, *args) -> Any:
        raise NotImplementedError

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the transport's connections (nothing to release by default)."""

    async def generate(self, prompt: str, model: str | None = None, image: str | Path | bytes | None = None,
                       wait_for_queue: float = 0.0, **params) -> Job:
        """As SyncCore.generate."""
        body, deadline = request_body(prompt, model, params), time.monotonic() + wait_for_queue
        while True:
            try:
                return Job(self, await self._op("submit", body, image))
            except WanError as e:
                pause = queue_pause(e, deadline)
                if pause is None:
                    raise
            await asyncio.sleep(pause)

    async def job(self, job_id: str) -> Job:
        return Job(self, await self._op("get", job_id))

    async def jobs(self, limit: int = 20, after: str | None = None) -> dict:
        return await self._op("list", limit, after)

    async def models(self) -> dict:
        return await self._op("models")

    async def session(self, model: str | None = None, prompt: str = "", seed: int | None = None,
                      size: str | None = None) -> Session:
        body = request_body(prompt, model, {"seed": seed, "size": size})
        return Session(self, await self._op("open_session", body))

    async def _status(self, job: Job) -> dict:
        job.data = await self._op("get", job.id)
        return job.data

    async def _wait(self, job: Job, progress: bool, timeout: float | None, poll: float) -> dict:
        deadline, bar = Deadline(job.id, timeout), Bar(progress, job.id)
        try:
            while not is_terminal(await self._status(job)):
                bar.update(job.data)
                deadline.check(job.data)
                await asyncio.sleep(poll)
            bar.update(job.data)
        finally:
            bar.close()
        return ended(job.data)

    async def _content(self, job: Job, timeout: float | None) -> bytes:
        if job.data["status"] != JobState.completed:
            await self._wait(job, False, timeout, 0.25)
        return await self._op("content", job.id)

    async def _save(self, job: Job, path: str | Path, timeout: float | None) -> Path:
        return write_file(path, await self._content(job, timeout))

    async def _cancel(self, job: Job) -> dict:
        job.data = await self._op("cancel", job.id)
        return job.data

    async def _blocks(self, job: Job, timeout: float | None, poll: float) -> AsyncIterator[tuple[int, bytes]]:
        deadline, sent = Deadline(job.id, timeout), 0
        while True:
            data = await self._status(job)
            while sent < data["blocks"]:
                yield sent, await self._op("block", job.id, sent)
                sent += 1
            if is_terminal(data):
                ended(data)
                return
            deadline.check(data)
            await asyncio.sleep(poll)

    async def _next_fragment(self, session: Session, prompt: str | None) -> Job:
        return Job(self, await self._op("fragment", session.id, prompt))

    async def _info(self, session: Session) -> dict:
        session.data = await self._op("session", session.id)
        return session.data

    async def _video(self, session: Session, path: str | Path | None) -> bytes | Path:
        data = await self._op("session_video", session.id)
        return data if path is None else write_file(path, data)

    async def _close(self, session: Session) -> dict:
        return await self._op("close_session", session.id)
