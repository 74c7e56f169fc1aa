"""The one Job / Session logic of deployments/client, without a wanserve server: every scenario runs over
all six clients — a plain sync and async core, HandleClient / AsyncHandleClient over a fake Serve handle,
WanClient / AsyncWanClient against a small stdlib HTTP server — all backed by one scripted FakeServer, and
each must give the same answers."""
from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from deployments.client import (
    AsyncHandleClient,
    AsyncWanClient,
    HandleClient,
    Job,
    JobCancelled,
    JobFailed,
    Session,
    WanClient,
    WanError,
)
from deployments.client.core import AsyncCore, SyncCore

FAST = 0.001  # poll interval in these tests


def state(job_id: str, status: str, blocks: int = 0, error: dict | None = None) -> dict:
    return {"id": job_id, "status": status, "progress": 100 if status == "completed" else 10, "stage": "dit",
            "step": 1, "total_steps": 4, "blocks": blocks, "error": error}


class FakeServer:
    """The router's handle API over scripted jobs: submit answers the first state of the next script, each
    `get` the next state (the last one repeats). `calls` records every call with its arguments."""

    def __init__(self):
        self.scripts: list[list[dict]] = []
        self.jobs: dict[str, list[dict]] = {}
        self.refusals: list[WanError] = []  # raised by the next submits, one each
        self.calls: list[tuple] = []
        self.sessions: dict[str, dict] = {}

    def script(self, *states: dict) -> None:
        self.scripts.append(list(states))

    def op(self, op: str, *args):
        self.calls.append((op, *args))
        return getattr(self, "op_" + op)(*args)

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c[0] == op)

    def op_submit(self, body, image):
        if self.refusals:
            raise self.refusals.pop(0)
        states = self.scripts.pop(0)
        self.jobs[states[0]["id"]] = states
        return states[0]

    def op_get(self, job_id):
        states = self.jobs[job_id]
        if len(states) > 1:
            states.pop(0)
        return states[0]

    def op_cancel(self, job_id):
        self.jobs[job_id] = [state(job_id, "cancelled")]
        return self.jobs[job_id][0]

    def op_content(self, job_id):
        return f"mp4 of {job_id}".encode()

    def op_block(self, job_id, index):
        return f"block {index} of {job_id}".encode()

    def op_list(self, limit, after):
        return {"data": [s[0] for s in self.jobs.values()][:limit], "has_more": False}

    def op_models(self):
        return {"data": [{"id": "fast"}]}

    def op_open_session(self, body):
        self.sessions["s1"] = {"id": "s1", "status": "active", "fragments": 0, **body}
        return self.sessions["s1"]

    def op_fragment(self, session_id, prompt):
        self.sessions[session_id]["fragments"] += 1
        return self.op_submit({"prompt": prompt}, None)

    def op_session(self, session_id):
        return self.sessions[session_id]

    def op_session_video(self, session_id):
        return f"video of {session_id}".encode()

    def op_close_session(self, session_id):
        self.sessions[session_id]["status"] = "closed"
        return self.sessions[session_id]


# ---- the six clients ------------------------------------------------------------------------------------------

class SyncFake(SyncCore):
    def __init__(self, server):
        self.server = server

    def _op(self, op, *args):
        return self.server.op(op, *args)


class AsyncFake(AsyncCore):
    def __init__(self, server):
        self.server = server

    async def _op(self, op, *args):
        await asyncio.sleep(0)
        return self.server.op(op, *args)


class ApiErrorLike(Exception):
    """What the router raises (deployments/api/errors.ApiError's attributes)."""

    def __init__(self, status, message, code, headers):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


class RayTaskErrorLike(Exception):
    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


class FakeHandle:
    """A DeploymentHandle of FakeServer: handle.<op>.remote(*args) -> .result(timeout_s=) or await."""

    def __init__(self, server):
        self.server, self.timeouts = server, []

    def __getattr__(self, op):
        handle = self

        class Method:
            def remote(self, *args):
                return Response(handle, op, args)

        return Method()


class Response:
    def __init__(self, handle, op, args):
        self.handle, self.op, self.args = handle, op, args

    def _run(self):
        try:
            return self.handle.server.op(self.op, *self.args)
        except WanError as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else {}
            raise RayTaskErrorLike(ApiErrorLike(e.status, e.message, e.code, headers)) from None

    def result(self, timeout_s):
        self.handle.timeouts.append((self.op, timeout_s))
        return self._run()

    def __await__(self):
        async def run():
            await asyncio.sleep(0)
            return self._run()

        return run().__await__()


ROUTES = [  # an independent reading of the HTTP API: (method, path pattern, handle op, answer is bytes)
    ("POST", r"/v1/videos", "submit", False), ("GET", r"/v1/videos", "list", False),
    ("GET", r"/v1/videos/([^/]+)", "get", False), ("POST", r"/v1/videos/([^/]+)/cancel", "cancel", False),
    ("GET", r"/v1/videos/([^/]+)/content", "content", True),
    ("GET", r"/v1/videos/([^/]+)/blocks/(\d+)", "block", True), ("GET", r"/v1/models", "models", False),
    ("POST", r"/v1/sessions", "open_session", False),
    ("POST", r"/v1/sessions/([^/]+)/fragments", "fragment", False),
    ("GET", r"/v1/sessions/([^/]+)", "session", False), ("GET", r"/v1/sessions/([^/]+)/video", "session_video", True),
    ("DELETE", r"/v1/sessions/([^/]+)", "close_session", False),
]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _serve(self):
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        for method, pattern, op, raw in ROUTES:
            m = re.fullmatch(pattern, url.path)
            if method == self.command and m:
                break
        else:
            return self._send(404, b'{"detail": "no route"}')
        args = list(m.groups())
        if op == "block":
            args[1] = int(args[1])
        if op == "submit":
            args += self._video_body(body)
        elif op == "list":
            q = parse_qs(url.query)
            args += [int(q["limit"][0]), q.get("after", [None])[0]]
        elif op == "open_session":
            args.append(json.loads(body))
        elif op == "fragment":
            args.append(json.loads(body).get("prompt"))
        try:
            out = self.server.fake.op(op, *args)
        except WanError as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else {}
            return self._send(e.status, json.dumps({"error": {"message": e.message, "code": e.code}}).encode(), headers)
        self._send(200, out if raw else json.dumps(out).encode())

    def _video_body(self, body: bytes) -> list:
        ctype = self.headers["Content-Type"]
        if ctype.startswith("application/json"):
            return [json.loads(body), None]
        msg = BytesParser(policy=policy.default).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
        fields, image = {}, None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "input_reference":
                image = part.get_payload(decode=True)
            else:
                fields[name] = part.get_content().strip()
        return [fields, image]

    def _send(self, status, data, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve


@pytest.fixture(scope="module")
def http_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


CLIENTS = ["sync", "async", "handle", "async_handle", "http", "async_http"]


@pytest.fixture(params=CLIENTS)
def client(request, http_url):
    server = FakeServer()
    http_url[0].fake = server
    kind = request.param
    made = {"sync": lambda: SyncFake(server), "async": lambda: AsyncFake(server),
            "handle": lambda: HandleClient(FakeHandle(server), timeout=30),
            "async_handle": lambda: AsyncHandleClient(FakeHandle(server)),
            "http": lambda: WanClient(http_url[1], timeout=30), "async_http": lambda: AsyncWanClient(http_url[1])}
    c = made[kind]()
    c.server = server
    return c


async def call(x):
    """A sync client's answer as it is, an async client's awaited: one scenario drives both."""
    return await x if inspect.isawaitable(x) else x


async def collect(blocks) -> tuple[list, Exception | None]:
    """What a blocks() iterator gave, sync or async, and the error it ended with (None: it just stopped)."""
    got = []
    try:
        if hasattr(blocks, "__aiter__"):
            async for b in blocks:
                got.append(b)
        else:
            got.extend(blocks)
    except (WanError, TimeoutError) as e:
        return got, e
    return got, None


def run(client, scenario):
    async def main():
        try:
            return await scenario()
        finally:
            if client.is_async:
                await client.close()

    return asyncio.run(main())


# ---- the scenarios ---------------------------------------------------------------------------------------------

def test_wait_polls_until_the_job_completes(client):
    client.server.script(state("j1", "queued"), state("j1", "in_progress"), state("j1", "in_progress"),
                         state("j1", "completed"))

    async def scenario():
        job = await call(client.generate("a fox", model="fast", seed=1, negative_prompt=None))
        assert isinstance(job, Job) and job.id == "j1" and job.data["status"] == "queued"
        done = await call(job.wait(timeout=10, poll=FAST))
        return job, done

    job, done = run(client, scenario)
    assert done["status"] == "completed" and job.data == done
    assert client.server.count("get") == 3  # in_progress, in_progress, completed: no poll after the end
    submit = client.server.calls[0]
    assert submit[0] == "submit" and submit[2] is None
    want = {"prompt": "a fox", "model": "fast", "seed": 1}  # None params are not sent
    assert submit[1] == want


@pytest.mark.parametrize("end, error", [("failed", JobFailed), ("cancelled", JobCancelled)])
def test_wait_raises_when_the_job_does_not_complete(client, end, error):
    client.server.script(state("j2", "queued"), state("j2", end, error={"message": "out of memory", "code": "oom"}))

    async def scenario():
        job = await call(client.generate("a fox"))
        with pytest.raises(error) as caught:
            await call(job.wait(poll=FAST))
        return caught.value

    e = run(client, scenario)
    assert e.job["id"] == "j2" and e.job["status"] == end
    if end == "failed":
        assert e.status == 500 and e.code == "oom" and "out of memory" in e.message
    else:
        assert e.status == 409 and e.code == "cancelled"


def test_wait_times_out_on_a_job_that_never_ends(client):
    client.server.script(state("j3", "queued"), state("j3", "in_progress"))

    async def scenario():
        job = await call(client.generate("a fox"))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="j3 still in_progress"):
            await call(job.wait(timeout=0.2, poll=0.01))
        return time.monotonic() - t0

    took = run(client, scenario)
    assert 0.2 <= took < 5 and client.server.count("get") >= 2


def test_blocks_yields_each_block_once_in_order_then_stops(client):
    client.server.script(*(state("f1", s, n) for s, n in [("queued", 0), ("in_progress", 0), ("in_progress", 2),
                                                           ("in_progress", 2), ("completed", 3)]))

    async def scenario():
        job = await call(client.generate("a boat"))
        return job, await collect(job.blocks(timeout=10, poll=FAST))

    job, (got, error) = run(client, scenario)
    assert error is None
    assert got == [(i, f"block {i} of f1".encode()) for i in range(3)]
    assert [c[2] for c in client.server.calls if c[0] == "block"] == [0, 1, 2]
    assert client.server.count("get") == 4 and job.data["status"] == "completed"


def test_blocks_of_a_failed_fragment_yields_what_exists_then_raises(client):
    client.server.script(state("f2", "queued"), state("f2", "in_progress", 1),
                         state("f2", "failed", 2, {"message": "replica died", "code": "replica_died"}))

    async def scenario():
        job = await call(client.generate("a boat"))
        return await collect(job.blocks(poll=FAST))

    got, error = run(client, scenario)
    assert [i for i, _ in got] == [0, 1]
    assert isinstance(error, JobFailed) and "replica died" in error.message and error.code == "replica_died"


def test_blocks_times_out_on_a_fragment_that_never_ends(client):
    client.server.script(state("f4", "queued"), state("f4", "in_progress", 1))

    async def scenario():
        job = await call(client.generate("a boat"))
        return await collect(job.blocks(timeout=0.2, poll=0.01))

    got, error = run(client, scenario)
    assert got == [(0, b"block 0 of f4")] and client.server.count("block") == 1
    assert isinstance(error, TimeoutError) and "f4 still in_progress" in str(error)


def test_wait_with_progress_draws_the_bar(capsys):
    server = FakeServer()
    server.script(state("j7", "queued"), state("j7", "in_progress"), state("j7", "completed"))
    assert SyncFake(server).generate("a fox").wait(progress=True, poll=FAST)["status"] == "completed"
    err = capsys.readouterr().err
    assert "j7" in err and "100%" in err and "completed dit 1/4" in err


def test_save_waits_then_writes_the_bytes(client, tmp_path):
    client.server.script(state("j4", "queued"), state("j4", "completed"))

    async def scenario():
        job = await call(client.generate("a fox"))
        return await call(job.save(tmp_path / "out" / "deep" / "fox.mp4", timeout=10))

    path = run(client, scenario)
    assert path == tmp_path / "out" / "deep" / "fox.mp4" and path.read_bytes() == b"mp4 of j4"
    assert client.server.count("content") == 1 and client.server.count("get") == 1


def test_a_full_queue_is_retried_for_wait_for_queue_seconds(client):
    full = WanError(429, "the queue is full", "queue_full", retry_after=0.05)
    client.server.refusals += [full, full]
    client.server.script(state("j5", "queued"))

    async def scenario():
        t0 = time.monotonic()
        job = await call(client.generate("a fox", wait_for_queue=10))
        waited = time.monotonic() - t0
        client.server.refusals.append(full)
        with pytest.raises(WanError) as refused:
            await call(client.generate("a fox"))
        client.server.refusals.append(WanError(400, "size must be a multiple of 16", "invalid_value"))
        with pytest.raises(WanError) as bad:
            await call(client.generate("a fox", wait_for_queue=10))
        return job, waited, refused.value, bad.value

    job, waited, refused, bad = run(client, scenario)
    assert job.id == "j5" and waited >= 0.1  # two Retry-After pauses
    assert (refused.status, refused.code, refused.message, refused.retry_after) == (429, "queue_full",
                                                                                    "the queue is full", 0.05)
    assert bad.status == 400 and "multiple of 16" in bad.message
    assert client.server.count("submit") == 5  # 3 for the first, 1 each after: a 400 is not retried


def test_session_fragments_video_and_close(client, tmp_path):
    client.server.script(state("p1", "queued"), state("p1", "completed"))
    client.server.script(state("p2", "queued"), state("p2", "completed"))

    async def scenario():
        session = await call(client.session(prompt="a paper boat", seed=7))
        assert isinstance(session, Session) and session.id == "s1"
        ctx = session if client.is_async else _AsyncWith(session)
        async with ctx:
            first = await call(session.next_fragment())
            second = await call(session.next_fragment(prompt="the sea"))
            done = [await call(first.wait(poll=FAST)), await call(second.wait(poll=FAST))]
            info = await call(session.info())
            whole = await call(session.video())
            path = await call(session.video(tmp_path / "s" / "boat.mp4"))
        return session, done, info, whole, path

    session, done, info, whole, path = run(client, scenario)
    opened = client.server.calls[0]
    assert opened[0] == "open_session" and opened[1] == {"prompt": "a paper boat", "seed": 7}
    assert [c[1:] for c in client.server.calls if c[0] == "fragment"] == [("s1", None), ("s1", "the sea")]
    assert [d["id"] for d in done] == ["p1", "p2"] and all(d["status"] == "completed" for d in done)
    assert info["fragments"] == 2 and session.data is info
    assert whole == b"video of s1" and path.read_bytes() == b"video of s1"
    assert client.server.calls[-1] == ("close_session", "s1") and client.server.sessions["s1"]["status"] == "closed"


class _AsyncWith:
    """`with session` written as `async with` so one scenario covers both kinds of client."""

    def __init__(self, session):
        self.session = session

    async def __aenter__(self):
        return self.session.__enter__()

    async def __aexit__(self, *exc):
        self.session.__exit__(*exc)


def test_jobs_models_and_cancel(client):
    client.server.script(state("j6", "queued"), state("j6", "in_progress"))

    async def scenario():
        job = await call(client.generate("a fox"))
        page = await call(client.jobs(limit=5, after="j0"))
        again = await call(client.job("j6"))
        cancelled = await call(job.cancel())
        with pytest.raises(JobCancelled):
            await call(job.wait(poll=FAST))
        return page, again, cancelled, await call(client.models())

    page, again, cancelled, models = run(client, scenario)
    assert page["data"][0]["id"] == "j6" and ("list", 5, "j0") in client.server.calls
    assert again.id == "j6" and again.data["status"] == "in_progress"
    assert cancelled["status"] == "cancelled" and models == {"data": [{"id": "fast"}]}


def test_a_session_refuses_the_wrong_kind_of_with(client):
    async def scenario():
        session = await call(client.session(prompt="p"))
        with pytest.raises(TypeError, match="async with" if client.is_async else "`with`"):
            if client.is_async:
                with session:
                    pass
            else:
                async with session:
                    pass

    run(client, scenario)
    assert client.server.count("close_session") == 0


# ---- what one transport adds ---------------------------------------------------------------------------------------

def test_http_upload_sends_the_image_and_form_fields(http_url, tmp_path):
    server = FakeServer()
    http_url[0].fake = server
    image = tmp_path / "first.png"
    image.write_bytes(b"\x89PNG fake frame")
    for c in (WanClient(http_url[1]), AsyncWanClient(http_url[1])):
        server.script(state("i1", "queued"))

        async def scenario(c=c):
            await call(c.generate("a boat", model="i2v", image=image, loras=[{"name": "x", "scale": 0.5}], seed=3))

        run(c, scenario)
        _, fields, sent = server.calls[-1]
        assert sent == b"\x89PNG fake frame"
        assert fields == {"prompt": "a boat", "model": "i2v", "seed": "3", "loras": '[{"name": "x", "scale": 0.5}]'}


def test_handle_client_timeouts_missing_blocks_and_foreign_errors():
    server = FakeServer()
    handle = FakeHandle(server)
    client = HandleClient(handle, timeout=30)
    client.session(prompt="p")
    server.script(state("f3", "queued"))
    client.generate("x", image=Path(__file__))
    assert handle.timeouts == [("open_session", 600.0), ("submit", 30)]
    assert server.calls[-1][2] == Path(__file__).read_bytes()  # a Path is read here; a str goes to the router

    server.op_block = lambda job_id, index: None
    with pytest.raises(WanError) as missing:
        client._op("block", "f3", 4)
    assert missing.value.status == 404 and "no block 4" in missing.value.message

    def broken(job_id):
        raise RuntimeError("actor died")

    server.op_get = broken
    with pytest.raises(RuntimeError, match="actor died"):  # not an ApiError: raised as it is
        client.job("f3")
    with pytest.raises(RuntimeError, match="actor died"):
        asyncio.run(AsyncHandleClient(handle).job("f3"))


def test_every_op_the_clients_call_is_a_method_of_the_routers_handle_api():
    """FakeServer answers exactly the ops the core sends (any other would fail the scenarios above), so each
    must be a Router method of the same name: what HandleClient calls on the real handle."""
    import ast

    tree = ast.parse((Path(__file__).parents[1] / "deployments" / "router" / "ingress.py").read_text())
    router = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Router")
    methods = {f.name for f in router.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    ops = {name[3:] for name in vars(FakeServer) if name.startswith("op_")}
    assert len(ops) == 12 and ops <= methods, ops - methods
