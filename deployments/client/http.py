"""The HTTP transports: the router's handle API mapped onto its HTTP routes once (`http_request`), sent with
requests (WanClient) or aiohttp (AsyncWanClient). An error answer becomes a WanError with the server's
message, code and Retry-After."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import AsyncCore, SyncCore, WanError, op_timeout, parse_retry_after

# op -> (HTTP method, path with the op's arguments, answer is bytes); submit, list, open_session and
# fragment carry a body or a query and are built in http_request.
ROUTES = {
    "get": ("GET", "/v1/videos/{}", False),
    "cancel": ("POST", "/v1/videos/{}/cancel", False),
    "content": ("GET", "/v1/videos/{}/content", True),
    "block": ("GET", "/v1/videos/{}/blocks/{}", True),
    "models": ("GET", "/v1/models", False),
    "health": ("GET", "/healthz", False),
    "session": ("GET", "/v1/sessions/{}", False),
    "session_video": ("GET", "/v1/sessions/{}/video", True),
    "close_session": ("DELETE", "/v1/sessions/{}", False),
}


@dataclass
class HttpRequest:
    method: str
    path: str
    raw: bool = False  # the answer is bytes (else JSON)
    json: dict | None = None
    params: dict | None = None
    form: dict[str, str] | None = None  # multipart fields, with `image` as the input_reference file
    image: bytes | None = None


def http_request(op: str, *args) -> HttpRequest:
    """The HTTP request of one handle-API call."""
    if op == "submit":
        body, image = args
        if image is None:
            return HttpRequest("POST", "/v1/videos", json=body)
        form = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in body.items()}
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return HttpRequest("POST", "/v1/videos", form=form, image=data)
    if op == "list":
        limit, after = args
        return HttpRequest("GET", "/v1/videos", params={"limit": limit, **({"after": after} if after else {})})
    if op == "open_session":
        return HttpRequest("POST", "/v1/sessions", json=args[0])
    if op == "fragment":
        session_id, prompt = args
        return HttpRequest("POST", f"/v1/sessions/{session_id}/fragments",
                           json={"prompt": prompt} if prompt is not None else {})
    method, path, raw = ROUTES[op]
    return HttpRequest(method, path.format(*args), raw)


def _error(status: int, headers, content: bytes) -> WanError:
    try:
        body = json.loads(content)
        err = body.get("error") or {}
        message, code = err.get("message") or body.get("detail") or content.decode(errors="replace"), err.get("code")
    except (ValueError, AttributeError):
        message, code = content.decode(errors="replace")[:500] or f"HTTP {status}", None
    return WanError(status, message, code, parse_retry_after(headers.get("Retry-After")))


class WanClient(SyncCore):
    """`WanClient(url, token)`: blocking, over requests; `timeout` seconds per call (session open and
    whole-session video: at least 600)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        import requests

        self.url, self.timeout = url.rstrip("/"), timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _op(self, op: str, *args) -> Any:
        req = http_request(op, *args)
        files = None if req.image is None else {"input_reference": ("image", req.image)}
        r = self.http.request(req.method, self.url + req.path, json=req.json, params=req.params, data=req.form,
                              files=files, timeout=op_timeout(op, self.timeout))
        if r.status_code >= 400:
            raise _error(r.status_code, r.headers, r.content)
        return r.content if req.raw else r.json()

    def health(self) -> dict:
        return self._op("health")


class AsyncWanClient(AsyncCore):
    """`async with AsyncWanClient(url, token) as c: job = await c.generate(...); await job.wait()`."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _op(self, op: str, *args) -> Any:
        import aiohttp

        req = http_request(op, *args)
        data = None
        if req.form is not None:
            data = aiohttp.FormData()
            for k, v in req.form.items():
                data.add_field(k, v)
            data.add_field("input_reference", req.image, filename="image")
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers)
        async with self._http.request(req.method, self.url + req.path, json=req.json, params=req.params, data=data,
                                      timeout=aiohttp.ClientTimeout(total=op_timeout(op, self.timeout))) as r:
            content = await r.read()
            if r.status >= 400:
                raise _error(r.status, r.headers, content)
            return content if req.raw else json.loads(content)

    async def health(self) -> dict:
        return await self._op("health")
