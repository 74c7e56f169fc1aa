"""Readiness vs liveness over a real HTTP server (uvicorn on localhost): /readyz is 503 naming the models
without a running replica until every model has one, while /healthz answers 200 ("degraded") throughout."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from serve_support import free_port

from deployments.router.service import Service


class Dispatcher:
    def __init__(self, replicas: dict):
        self.replicas, self.running, self.polls = replicas, {}, 0
        self.up_after_poll: dict | None = None

    async def poll(self, force: bool = False):
        self.polls += 1
        if self.up_after_poll is not None:
            self.replicas = self.up_after_poll
        return self.replicas


def fake_service(dispatchers: dict) -> SimpleNamespace:
    svc = SimpleNamespace(dispatchers=dispatchers, errors=SimpleNamespace(snapshot=lambda: {}),
                          store=SimpleNamespace(queue_depth=lambda model=None: 0),
                          args=SimpleNamespace(limits=SimpleNamespace(max_upload_bytes=1 << 20), max_queued_jobs=4),
                          metrics=SimpleNamespace(reject=lambda status: None), jobs=SimpleNamespace(),
                          sessions=SimpleNamespace(), catalog=SimpleNamespace())
    svc.health = lambda: Service.health(svc)
    svc.waiting_for_replicas = lambda: Service.waiting_for_replicas(svc)
    return svc


@pytest.fixture
def server():
    import uvicorn

    from deployments.api.app import build_http_app

    dispatchers = {"t2v": Dispatcher({"r1": {}}), "causvid": Dispatcher({})}
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_http_app(fake_service(dispatchers), token=None), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", dispatchers
    srv.should_exit = True
    thread.join(10)


def test_ready_only_when_every_model_has_a_replica(server):
    url, dispatchers = server
    r = requests.get(url + "/readyz", timeout=10)
    assert r.status_code == 503 and r.json() == {"ready": False, "waiting_for": ["causvid"]}
    health = requests.get(url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "degraded" and health.json()["ready"] is False
    assert health.json()["models"] == {"t2v": 1, "causvid": 0}
    # the waiting model is polled at once (not at the dispatcher's next idle poll): ready as soon as it is up
    polls = dispatchers["causvid"].polls
    dispatchers["causvid"].up_after_poll = {"r2": {}}
    r = requests.get(url + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json() == {"ready": True, "waiting_for": []}
    assert dispatchers["causvid"].polls == polls + 1 and dispatchers["t2v"].polls == 0
    health = requests.get(url + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["ready"] is True


def test_readiness_is_open_without_the_token():
    from deployments.api.app import build_http_app

    app = build_http_app(fake_service({"m": Dispatcher({"r": {}})}), token="secret")
    guarded = {r.path for r in app.routes if getattr(r, "dependencies", None)}
    assert "/readyz" not in guarded and "/healthz" not in guarded and "/v1/models" in guarded
    assert asyncio.run(Service.waiting_for_replicas(fake_service({"m": Dispatcher({})}))) == ["m"]
