"""Python clients of a wanserve endpoint: over HTTP (sync and asyncio) and over a Serve handle.

    from deployments.client import WanClient
    client = WanClient("http://127.0.0.1:8000", token=None)
    job = client.generate("a red fox running through snow", size="832x480", num_frames=81)
    job.wait(progress=True)          # tqdm bar; raises JobFailed / JobCancelled
    job.save("fox.mp4")

    with client.session(prompt="a paper boat on a river", seed=7) as s:   # CausVid
        part = s.next_fragment()
        for index, mp4 in part.blocks():  # each block as soon as it is decoded
            ...
        s.next_fragment(prompt="the boat reaches the sea").wait()
        s.video("boat.mp4")

`AsyncWanClient` is the same over aiohttp (`await client.generate(...)`, `await job.wait()`).
`HandleClient(serve.get_app_handle("wanserve"))` is the same for code running inside the Ray cluster
(a task, an actor, another deployment): it calls the router's handle API, no HTTP; inside asyncio code
use `AsyncHandleClient`. Every error is a `WanError` carrying the server's status, code and message.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

TERMINAL = ("completed", "failed", "cancelled")


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
    def __init__(self, job: dict):
        super().__init__(409, f"job {job['id']} was cancelled", "cancelled")
        self.job = job


def _params(prompt: str, model: str | None, params: dict) -> dict:
    body = {"prompt": prompt, **({"model": model} if model else {})}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _ended(job: dict) -> dict:
    if job["status"] == "failed":
        raise JobFailed(job)
    if job["status"] == "cancelled":
        raise JobCancelled(job)
    return job


def _wait(job: Job | HandleJob, progress: bool, timeout: float | None, poll: float) -> dict:
    """Poll job.status() until the job ends (a tqdm bar with progress=True); what Job.wait returns."""
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = _Bar(progress, job.id)
    try:
        while job.status()["status"] not in TERMINAL:
            bar.update(job.data)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job.id} still {job.data['status']} after {timeout} s")
            time.sleep(poll)
        bar.update(job.data)
    finally:
        bar.close()
    return _ended(job.data)


class _Bar:
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


# ---- HTTP (sync) ---------------------------------------------------------------------------------------------

class WanClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        import requests

        self.url, self.timeout = url.rstrip("/"), timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kw) -> Any:
        r = self.http.request(method, self.url + path, timeout=kw.pop("timeout", self.timeout), **kw)
        if r.status_code >= 400:
            raise _error(r.status_code, r.headers, r.content)
        return r

    def generate(self, prompt: str, model: str | None = None, image: str | Path | bytes | None = None,
                 wait_for_queue: float = 0.0, **params) -> "Job":
        """Queue a video. image: an I2V first frame (file path or bytes: uploaded). params: size
        ("832x480"), num_frames, seed, negative_prompt, loras, num_fragments. wait_for_queue: seconds to keep
        retrying while the queue is full (429), honouring Retry-After."""
        body = _params(prompt, model, params)
        deadline = time.monotonic() + wait_for_queue
        while True:
            try:
                if image is None:
                    r = self._call("POST", "/v1/videos", json=body)
                else:
                    data = image if isinstance(image, bytes) else Path(image).read_bytes()
                    form = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in body.items()}
                    r = self._call("POST", "/v1/videos", data=form, files={"input_reference": ("image", data)})
                return Job(self, r.json())
            except WanError as e:
                if e.status != 429 or time.monotonic() >= deadline:
                    raise
                time.sleep(min(e.retry_after or 1.0, max(0.1, deadline - time.monotonic())))

    def job(self, job_id: str) -> "Job":
        return Job(self, self._call("GET", f"/v1/videos/{job_id}").json())

    def jobs(self, limit: int = 20, after: str | None = None) -> dict:
        q = {"limit": limit, **({"after": after} if after else {})}
        return self._call("GET", "/v1/videos", params=q).json()

    def models(self) -> dict:
        return self._call("GET", "/v1/models").json()

    def health(self) -> dict:
        return self._call("GET", "/healthz").json()

    def session(self, model: str | None = None, prompt: str = "", seed: int | None = None,
                size: str | None = None) -> "Session":
        body = _params(prompt, model, {"seed": seed, "size": size})
        return Session(self, self._call("POST", "/v1/sessions", json=body, timeout=max(self.timeout, 600)).json())


class Job:
    def __init__(self, client: WanClient, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.data['status']}, {self.data['progress']}%)"

    def status(self) -> dict:
        self.data = self.client._call("GET", f"/v1/videos/{self.id}").json()
        return self.data

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.25) -> dict:
        """Until the job ends; returns it completed, raises JobFailed / JobCancelled / TimeoutError."""
        return _wait(self, progress, timeout, poll)

    def content(self, timeout: float | None = None) -> bytes:
        if self.data["status"] != "completed":
            self.wait(timeout=timeout)
        return self.client._call("GET", f"/v1/videos/{self.id}/content").content

    def save(self, path: str | Path, timeout: float | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content(timeout))
        return path

    def cancel(self) -> dict:
        self.data = self.client._call("POST", f"/v1/videos/{self.id}/cancel").json()
        return self.data

    def blocks(self, timeout: float | None = None, poll: float = 0.1) -> Iterator[tuple[int, bytes]]:
        """CausVid fragment jobs: (index, mp4 bytes) of each decoded block as soon as it exists, until the
        job ends (then the rest)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = 0
        while True:
            job = self.status()
            while sent < job["blocks"]:
                yield sent, self.client._call("GET", f"/v1/videos/{self.id}/blocks/{sent}").content
                sent += 1
            if job["status"] in TERMINAL:
                _ended(job)
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {job['status']} after {timeout} s")
            time.sleep(poll)


class Session:
    def __init__(self, client: WanClient, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next_fragment(self, prompt: str | None = None) -> Job:
        body = {"prompt": prompt} if prompt is not None else {}
        return Job(self.client, self.client._call("POST", f"/v1/sessions/{self.id}/fragments", json=body).json())

    def info(self) -> dict:
        self.data = self.client._call("GET", f"/v1/sessions/{self.id}").json()
        return self.data

    def video(self, path: str | Path | None = None) -> bytes | Path:
        """The whole video so far (mp4); written to path if given."""
        data = self.client._call("GET", f"/v1/sessions/{self.id}/video", timeout=max(self.client.timeout, 600)).content
        if path is None:
            return data
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def close(self) -> dict:
        return self.client._call("DELETE", f"/v1/sessions/{self.id}").json()


def _error(status: int, headers, content: bytes) -> WanError:
    try:
        body = json.loads(content)
        err = body.get("error") or {}
        message, code = err.get("message") or body.get("detail") or content.decode(errors="replace"), err.get("code")
    except (ValueError, AttributeError):
        message, code = content.decode(errors="replace")[:500] or f"HTTP {status}", None
    retry = headers.get("Retry-After")
    return WanError(status, message, code, float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)


# ---- HTTP (asyncio, aiohttp) ------------------------------------------------------------------------------------

class AsyncWanClient:
    """`async with AsyncWanClient(url, token) as c: job = await c.generate(...); await job.wait()`."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = None

    async def __aenter__(self) -> "AsyncWanClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, raw: bool = False, **kw) -> Any:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers,
                                               timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._http.request(method, self.url + path, **kw) as r:
            content = await r.read()
            if r.status >= 400:
                raise _error(r.status, r.headers, content)
            return content if raw else json.loads(content)

    async def generate(self, prompt: str, model: str | None = None, image: str | Path | bytes | None = None,
                       **params) -> "AsyncJob":
        import aiohttp

        body = _params(prompt, model, params)
        if image is None:
            return AsyncJob(self, await self._call("POST", "/v1/videos", json=body))
        form = aiohttp.FormData()
        for k, v in body.items():
            form.add_field(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form.add_field("input_reference", data, filename="image")
        return AsyncJob(self, await self._call("POST", "/v1/videos", data=form))

    async def job(self, job_id: str) -> "AsyncJob":
        return AsyncJob(self, await self._call("GET", f"/v1/videos/{job_id}"))

    async def models(self) -> dict:
        return await self._call("GET", "/v1/models")

    async def session(self, model: str | None = None, prompt: str = "", seed: int | None = None,
                      size: str | None = None) -> "AsyncSession":
        return AsyncSession(self, await self._call("POST", "/v1/sessions",
                                                   json=_params(prompt, model, {"seed": seed, "size": size})))


class AsyncJob:
    def __init__(self, client: AsyncWanClient, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    async def status(self) -> dict:
        self.data = await self.client._call("GET", f"/v1/videos/{self.id}")
        return self.data

    async def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.25) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar(progress, self.id)
        try:
            while (await self.status())["status"] not in TERMINAL:
                bar.update(self.data)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {self.data['status']} after {timeout} s")
                await asyncio.sleep(poll)
        finally:
            bar.close()
        return _ended(self.data)

    async def content(self) -> bytes:
        if self.data["status"] != "completed":
            await self.wait()
        return await self.client._call("GET", f"/v1/videos/{self.id}/content", raw=True)

    async def save(self, path: str | Path) -> Path:
        data = await self.content()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    async def cancel(self) -> dict:
        self.data = await self.client._call("POST", f"/v1/videos/{self.id}/cancel")
        return self.data

    async def blocks(self, poll: float = 0.1) -> AsyncIterator[tuple[int, bytes]]:
        sent = 0
        while True:
            job = await self.status()
            while sent < job["blocks"]:
                yield sent, await self.client._call("GET", f"/v1/videos/{self.id}/blocks/{sent}", raw=True)
                sent += 1
            if job["status"] in TERMINAL:
                _ended(job)
                return
            await asyncio.sleep(poll)


class AsyncSession:
    def __init__(self, client: AsyncWanClient, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    async def next_fragment(self, prompt: str | None = None) -> AsyncJob:
        body = {"prompt": prompt} if prompt is not None else {}
        return AsyncJob(self.client, await self.client._call("POST", f"/v1/sessions/{self.id}/fragments", json=body))

    async def info(self) -> dict:
        self.data = await self.client._call("GET", f"/v1/sessions/{self.id}")
        return self.data

    async def video(self) -> bytes:
        return await self.client._call("GET", f"/v1/sessions/{self.id}/video", raw=True)

    async def close(self) -> dict:
        return await self.client._call("DELETE", f"/v1/sessions/{self.id}")


# ---- inside Ray: the router's DeploymentHandle ---------------------------------------------------------------------

def _handle_error(e: BaseException) -> BaseException:
    """An ApiError raised in the router arrives wrapped (RayTaskError); make it a WanError again."""
    cause = getattr(e, "cause", None) or e
    status = getattr(cause, "status", None)
    if isinstance(status, int):
        return WanError(status, getattr(cause, "message", str(cause)), getattr(cause, "code", None))
    return e


class HandleClient:
    """Sync client over the router's handle: `HandleClient(serve.get_app_handle("wanserve"))`.

    Jobs are polled like over HTTP (`poll` seconds); results come back as bytes through the object store.
    """

    def __init__(self, router_handle, timeout: float = 60.0):
        self.handle, self.timeout = router_handle, timeout

    def _call(self, method: str, *args, timeout: float | None = None, **kw) -> Any:
        try:
            return getattr(self.handle, method).remote(*args, **kw).result(timeout_s=timeout or self.timeout)
        except Exception as e:
            raise _handle_error(e) from e

    def generate(self, prompt: str, model: str | None = None, image: str | Path | bytes | None = None,
                 **params) -> "HandleJob":
        if isinstance(image, Path):
            image = image.read_bytes()
        return HandleJob(self, self._call("submit", _params(prompt, model, params), image))

    def job(self, job_id: str) -> "HandleJob":
        return HandleJob(self, self._call("get", job_id))

    def models(self) -> dict:
        return self._call("models")

    def session(self, model: str | None = None, prompt: str = "", seed: int | None = None,
                size: str | None = None) -> "HandleSession":
        return HandleSession(self, self._call("open_session", _params(prompt, model, {"seed": seed, "size": size}),
                                              timeout=max(self.timeout, 600)))


class HandleJob:
    def __init__(self, client: HandleClient, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    def status(self) -> dict:
        self.data = self.client._call("get", self.id)
        return self.data

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 0.25) -> dict:
        return _wait(self, progress, timeout, poll)

    def content(self) -> bytes:
        if self.data["status"] != "completed":
            self.wait()
        return self.client._call("content", self.id)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content())
        return path

    def cancel(self) -> dict:
        self.data = self.client._call("cancel", self.id)
        return self.data


class HandleSession:
    def __init__(self, client: HandleClient, data: dict):
        self.client, self.data, self.id = client, data, data["id"]

    def next_fragment(self, prompt: str | None = None) -> HandleJob:
        return HandleJob(self.client, self.client._call("fragment", self.id, prompt))

    def info(self) -> dict:
        self.data = self.client._call("session", self.id)
        return self.data

    def video(self, path: str | Path | None = None) -> bytes | Path:
        data = self.client._call("session_video", self.id, timeout=max(self.client.timeout, 600))
        if path is None:
            return data
        Path(path).write_bytes(data)
        return Path(path)

    def close(self) -> dict:
        return self.client._call("close_session", self.id)


class AsyncHandleClient:
    """Async client over the router's handle, for asyncio code inside Ray (e.g. another deployment)."""

    def __init__(self, router_handle):
        self.handle = router_handle

    async def _call(self, method: str, *args, **kw) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args, **kw)
        except Exception as e:
            raise _handle_error(e) from e

    async def generate(self, prompt: str, model: str | None = None, image: bytes | None = None, **params) -> dict:
        return await self._call("submit", _params(prompt, model, params), image)

    async def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.25) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (job := await self._call("get", job_id))["status"] not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            await asyncio.sleep(poll)
        return _ended(job)

    async def content(self, job_id: str) -> bytes:
        return await self._call("content", job_id)

    async def cancel(self, job_id: str) -> dict:
        return await self._call("cancel", job_id)
