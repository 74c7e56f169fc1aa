"""Failures of a real Serve app: the router restarts (jobs and results survive), a worker actor dies
mid-job (the replica rebuilds its group and retries once; twice is a failed job with the reason), a
worker dies while idle (the health check notices). Every wait is bounded: none of this may hang."""
from __future__ import annotations

import os
import signal

import pytest
import ray
from ray import serve
from serve_support import BASE_CFG, DISTILL_CFG, SMALL, Api, decode, model_entry, serve_app, wait_until, write_models

APP = "serve_faults"


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_faults")
    models = write_models(root / "models")
    args = {"state_dir": str(root / "state"), "max_queued_jobs": 8, "max_attempts": 2,
            "models": [model_entry("fast", models["t2v"], "wan2.1_distill", "t2v", DISTILL_CFG),
                       model_entry("slow", models["t2v"], "wan2.1", "t2v", BASE_CFG, config={"infer_steps": 300})]}
    with serve_app(args, APP) as url:
        yield {"url": url, "api": Api(url)}


def worker_pid(model: str) -> int:
    health = serve.get_deployment_handle(f"Generator-{model}", app_name=APP).health.remote().result(timeout_s=30)
    assert health["healthy"], health
    return health["ranks"][0]["pid"]


def status(model: str) -> dict:
    return serve.get_deployment_handle(f"Generator-{model}", app_name=APP).status.remote().result(timeout_s=30)


def test_router_restart_keeps_jobs_and_results(env, tmp_path):
    api = env["api"]
    done = api.wait(api.submit(model="fast", prompt="a red fox", **SMALL)["id"])
    before = api.get(done["url"]).content
    running = api.submit(model="slow", prompt="a blue circle", **SMALL)
    queued = api.submit(model="slow", prompt="a green square", **SMALL)
    api.wait(running["id"], 30, until=("in_progress",))

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{APP}#Router#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    wait_until(lambda: api.get("/healthz", timeout=5).json()["status"] == "ok", 90, "a new router")

    again = api.job(done["id"])
    assert again["status"] == "completed" and api.get(done["url"]).content == before
    ends = {j: api.wait(j, 90) for j in (running["id"], queued["id"])}
    assert all(j["status"] == "completed" for j in ends.values()), ends
    assert ends[running["id"]]["attempts"] == 2  # interrupted by the restart, run again
    assert decode(api.get(ends[queued["id"]]["url"]).content, tmp_path).shape == (5, 32, 48, 3)
    listed = {j["id"] for j in api.get("/v1/videos", params={"limit": 10}).json()["data"]}
    assert {done["id"], running["id"], queued["id"]} <= listed


def test_worker_killed_mid_job_is_rebuilt_and_retried(env):
    api = env["api"]
    rebuilds = status("slow")["rebuilds"]
    job = api.submit(model="slow", prompt="a paper boat", **SMALL)
    wait_until(lambda: api.job(job["id"])["step"] > 2, 30, "job under way")
    os.kill(worker_pid("slow"), signal.SIGKILL)
    done = api.wait(job["id"], 90)
    assert done["status"] == "completed", done
    assert status("slow")["rebuilds"] == rebuilds + 1


def test_worker_killed_twice_fails_with_the_reason(env):
    api = env["api"]
    job = api.submit(model="slow", prompt="a yellow star", **SMALL)
    wait_until(lambda: api.job(job["id"])["step"] > 2, 30, "job under way")
    first = worker_pid("slow")
    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: (p := worker_pid("slow")) != first and p, 60, "the rebuilt group")
    wait_until(lambda: api.job(job["id"])["step"] > 2, 30, "the retry under way")
    os.kill(second, signal.SIGKILL)
    done = api.wait(job["id"], 90)
    assert done["status"] == "failed", done
    assert "failed twice" in done["error"]["message"] and "died" in done["error"]["message"], done["error"]
    # the replica is usable again afterwards
    assert api.wait(api.submit(model="slow", prompt="a red fox", **SMALL)["id"], 90)["status"] == "completed"


def test_worker_killed_while_idle_fails_the_health_check(env):
    api = env["api"]
    before = status("fast")["replica"]
    os.kill(worker_pid("fast"), signal.SIGKILL)
    # check_health asks the ranks, raises, and Serve replaces the replica (and its worker actors)
    # (starting the new replica and its worker group takes ~60 s on a loaded 2-core machine)
    wait_until(lambda: status("fast")["replica"] != before, 180, "Serve replacing the unhealthy replica")
    done = api.wait(api.submit(model="fast", prompt="a green square", **SMALL)["id"], 120)
    assert done["status"] == "completed", done
