"""The Serve app over real HTTP on localhost: jobs from submit to a decoded mp4, I2V uploads, cancel,
the bounded queue, bad input, LoRAs, LightX2V routes, the Python clients.

One app for the module (fast distill T2V, a slow 400-step base T2V for progress and cancel, a distill
I2V), a bearer token, small limits; the session Ray instance of conftest.py.
"""
from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter

import pytest
import torch
from helpers import torch_threads
from serve_support import (
    BASE_CFG,
    DISTILL_CFG,
    REPO,
    SMALL,
    TERMINAL,
    Api,
    decode,
    model_entry,
    png_bytes,
    serve_app,
    wait_until,
    write_lora,
    write_models,
)

from model.tae import TAEHV, save_tae

TOKEN = "test-token-123"
APP = "serve_api"


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    models = write_models(root / "models")
    save_tae(TAEHV(4, (8, 8, 8, 4), encoder=False), models["t2v"] / "tae" / "tiny.pth")  # random: a known decoder
    write_lora(root / "loras" / "style.safetensors")
    write_lora(root / "loras" / "broken.safetensors", rank_dim=47)  # does not fit the model
    images = root / "images"
    images.mkdir()
    (images / "cat.png").write_bytes(png_bytes(seed=3))
    (root / "secret.png").write_bytes(png_bytes(seed=4))
    args = {
        "state_dir": str(root / "state"),
        "models": [model_entry("fast", models["t2v"], "wan2.1_distill", "t2v", DISTILL_CFG,
                               config={"tae_path": "tae/tiny.pth"}),
                   model_entry("slow", models["t2v"], "wan2.1", "t2v", BASE_CFG, config={"infer_steps": 400}),
                   model_entry("i2v", models["i2v"], "wan2.1_distill", "i2v", DISTILL_CFG, config={"text_len": 512})],
        "image_roots": [str(images)],
        "lora_roots": [str(root / "loras")],
        "max_queued_jobs": 3,
        "auth_token_env": "WANSERVE_TEST_TOKEN",
        "limits": {"max_prompt_chars": 200, "max_frames": 17, "max_pixels": 64 * 64, "max_upload_bytes": 64 << 10},
    }
    with serve_app(args, APP, router_env={"WANSERVE_TEST_TOKEN": TOKEN}) as url:
        yield {"url": url, "api": Api(url, TOKEN), "root": root, "args": args}


@pytest.fixture
def api(env) -> Api:
    return env["api"]


def drain(api: Api, timeout: float = 60) -> None:
    """Cancel whatever is queued or running and wait until nothing is (tests start from an idle app)."""
    for job in api.get("/v1/videos", params={"limit": 100}).json()["data"]:
        if job["status"] not in TERMINAL:
            api.post(f"/v1/videos/{job['id']}/cancel")
    wait_until(lambda: api.get("/healthz").json()["running"] == 0 and api.get("/healthz").json()["queued"] == 0,
               timeout, "app idle")


# ---- the happy path -------------------------------------------------------------------------------------------

def test_submit_progress_completed_mp4(api, tmp_path):
    job = api.submit(model="slow", prompt="a red fox running through snow", seed=3, **SMALL)
    assert job["status"] == "queued" and job["size"] == "48x32" and job["num_frames"] == 5 and job["seed"] == 3
    seen = []
    done = wait_until(lambda: (j := api.job(job["id"]), seen.append(j["progress"]))[0]["status"] in TERMINAL and j,
                      60, "slow job", poll=0.02)
    assert done["status"] == "completed", done
    assert seen == sorted(seen), f"progress went back: {seen}"
    assert any(0 < p < 100 for p in seen), f"no intermediate progress seen: {seen}"
    assert done["progress"] == 100 and done["attempts"] == 1 and done["url"] == f"/v1/videos/{job['id']}/content"
    assert {"dit", "vae", "queue", "total"} <= set(done["timings"])
    r = api.get(done["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    frames = decode(r.content, tmp_path)
    assert frames.shape == (5, 32, 48, 3)


def test_events_stream_and_listing(api):
    job = api.submit(model="fast", prompt="blue circle moving right", **SMALL)
    with api.get(f"/v1/videos/{job['id']}/events", stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[0]["type"] == "job" and events[-1]["type"] == "job"
    assert events[-1]["job"]["status"] == "completed"
    # listing: newest first, cursor paging, filters
    for _ in range(2):
        api.wait(api.submit(model="fast", prompt="green square", **SMALL)["id"])
    first = api.get("/v1/videos", params={"limit": 2}).json()
    assert first["object"] == "list" and len(first["data"]) == 2 and first["has_more"]
    nxt = api.get("/v1/videos", params={"limit": 2, "after": first["last_id"]}).json()
    assert not {j["id"] for j in nxt["data"]} & {j["id"] for j in first["data"]}
    assert api.get("/v1/videos", params={"model": "fast", "status": "completed"}).json()["data"]
    bad = api.get("/v1/videos", params={"after": "vid_" + "0" * 24})
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]["message"]


def test_models_health_openapi(env, api):
    models = api.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"fast", "slow", "i2v"}
    assert models["loras"] == ["broken", "style"]
    assert all(m["replicas"] == 1 for m in models["data"])
    health = api.get("/healthz", headers={"Authorization": ""}).json()  # open without a token
    assert health["status"] == "ok"
    assert health["ready"] is True and health["models"] == {"fast": 1, "slow": 1, "i2v": 1}
    # the kernels each replica's rank 0 runs (engine.rank.runtime_info), not the config echoed back
    sdpa = {"self_attn_1_type": "torch_sdpa", "cross_attn_1_type": "torch_sdpa", "cross_attn_2_type": "torch_sdpa"}
    for name in ("fast", "slow", "i2v"):
        (runtime,) = health["runtime"][name].values()
        assert runtime["attention"] == sdpa and runtime["compile"] == {"compiled": False}
        info = next(m for m in models["data"] if m["id"] == name)
        assert info["attention"] == sdpa and list(info["runtime"].values()) == [runtime]
    ready = api.get("/readyz", headers={"Authorization": ""})  # every model has its replica
    assert ready.status_code == 200 and ready.json() == {"ready": True, "waiting_for": []}
    spec = api.get("/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/{video_id}/content", "/v1/sessions", "/v1/tasks/video"} <= set(spec["paths"])
    assert "VideoCreate" in spec["components"]["schemas"]
    page = api.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and "<video" in page.text


# ---- I2V ----------------------------------------------------------------------------------------------------------

def test_i2v_upload_base64_and_rooted_path(api, tmp_path):
    png = png_bytes()
    r = api.post("/v1/videos", data={"prompt": "a paper boat on the river", "model": "i2v", **SMALL},
                 files={"input_reference": ("boat.png", png, "image/png")})
    assert r.status_code == 202, r.text
    b64 = api.submit(prompt="a paper boat", image=base64.b64encode(png).decode(), **SMALL)
    assert b64["model"] == "i2v"  # the default model of a request with an image
    path = api.submit(prompt="a paper boat", model="i2v", image="cat.png", **SMALL)
    for j in (r.json(), b64, path):
        done = api.wait(j["id"])
        assert done["status"] == "completed", done
        assert decode(api.get(done["url"]).content, tmp_path).shape == (5, 32, 48, 3)


# ---- cancel, queue bound ----------------------------------------------------------------------------------------

def test_cancel_queued_and_running(api):
    drain(api)
    running = api.submit(model="slow", prompt="a red fox", **SMALL)
    queued = api.submit(model="slow", prompt="a blue circle", **SMALL)
    api.wait(running["id"], 30, until=("in_progress",))
    wait_until(lambda: api.job(running["id"])["step"] > 1, 30, "running job past its first steps")
    r = api.post(f"/v1/videos/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # a queued job ends at once
    t = api.post(f"/v1/videos/{running['id']}/cancel").json()
    assert t["status"] in ("in_progress", "cancelled")
    done = api.wait(running["id"], 15)
    assert done["status"] == "cancelled", done
    assert done["progress"] < 90  # stopped mid-way, not run to the end
    assert api.get(f"/v1/videos/{running['id']}/content").status_code == 409
    # the replica is free again: the next job runs
    assert api.wait(api.submit(model="fast", prompt="a yellow star", **SMALL)["id"])["status"] == "completed"


def test_queue_full_429_and_no_accepted_job_lost(api):
    drain(api)
    accepted = [api.submit(model="slow", prompt="a red fox", **SMALL)]
    api.wait(accepted[0]["id"], 30, until=("in_progress",))
    accepted += [api.submit(model="slow", prompt=f"a fox number {i}", **SMALL) for i in range(3)]
    r = api.post("/v1/videos", json={"model": "slow", "prompt": "one too many", **SMALL})
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]["message"]
    r = api.post("/v1/tasks/video", json={"prompt": "one too many"})  # LightX2V route: same bound
    assert r.status_code == 429
    listed = {j["id"] for j in api.get("/v1/videos", params={"limit": 50}).json()["data"]}
    assert {j["id"] for j in accepted} <= listed
    api.post(f"/v1/videos/{accepted[0]['id']}/cancel")  # make room; the three queued ones all run
    ends = [api.wait(j["id"], 60)["status"] for j in accepted]
    assert ends == ["cancelled", "completed", "completed", "completed"], ends


# ---- bad input -----------------------------------------------------------------------------------------------------

BAD = [
    ({"prompt": "x", "size": "47x32"}, 400, "multiple of 16"),
    ({"prompt": "x", "size": "big"}, 422, "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "640x480"}, 400, "at most 4096"),
    ({"prompt": "x", "num_frames": 6}, 400, "4n+1"),
    ({"prompt": "x", "num_frames": 21}, 400, "at most 17"),
    ({"prompt": "x", "model": "nope"}, 400, "available"),
    ({"prompt": "   "}, 400, "must not be empty"),
    ({"prompt": "x" * 201}, 400, "at most 200"),
    ({"model": "fast"}, 422, "prompt: required"),
    ({"prompt": "x", "model": "i2v"}, 400, "give an image"),
    ({"prompt": "x", "model": "fast", "image": "cat.png"}, 400, "text-to-video"),
    ({"prompt": "x", "loras": ["nope"]}, 400, "unknown LoRA 'nope'; available: ['broken', 'style']"),
    ({"prompt": "x", "model": "i2v", "image": "../secret.png"}, 403, "outside the allowed folders"),
    ({"prompt": "x", "model": "i2v", "image": "/etc/passwd"}, 403, "outside the allowed folders"),
    ({"prompt": "x", "model": "i2v", "image": "missing.png"}, 400, "not found"),
    ({"prompt": "x", "model": "i2v", "image": "https://example.invalid/a.png"}, 400, "not fetched"),
    ({"prompt": "x", "model": "i2v", "image": "A" * 100}, 400, "not a readable image"),
    ({"prompt": "x", "colour": "red"}, 422, "colour: unknown field"),
    ({"prompt": "x", "num_fragments": 2}, 400, "only CausVid"),
    ({"prompt": "x", "model": "slow", "decoder": "tiny"}, 400, "has no tiny decoder"),
    ({"prompt": "x", "decoder": "small"}, 422, "decoder"),
    ({"prompt": "x", "prompt_schedule": [{"prompt": "x", "fragments": 1}]}, 400, "prompt_schedule: only CausVid"),
]


@pytest.mark.parametrize("body, status, says", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_input_says_what_to_fix(api, body, status, says):
    r = api.post("/v1/videos", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"], err
    assert r.json()["detail"] == err["message"]


def test_auth_upload_and_content_type_errors(env, api):
    url = env["url"]
    plain = Api(url)
    r = plain.post("/v1/videos", json={"prompt": "x"})
    assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert Api(url, "wrong").get("/v1/models").status_code == 401
    big = b"\x89PNG" + b"0" * (70 << 10)
    r = api.post("/v1/videos", data={"prompt": "x", "model": "i2v"}, files={"input_reference": ("a.png", big)})
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]
    r = api.post("/v1/videos", data=b"prompt=x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = api.post("/v1/videos", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert api.get("/v1/videos/vid_" + "0" * 24).status_code == 404
    assert api.post("/v1/sessions", json={"prompt": "x", "model": "fast"}).status_code == 400


def test_tiny_decoder_per_request(env, api, tmp_path):
    """decoder: "tiny" on a model whose config has tae_path: the served mp4 is the in-process pipeline's tiny
    decode of the same request (same bytes), and differs from the full decode; GET /v1/models lists it."""
    from model.config import load_run_config
    from model.pipeline import WanPipeline
    from model.video import encode_mp4

    info = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert info["fast"]["decoders"] == ["full", "tiny"] and info["fast"]["decoder"] == "full"
    assert info["slow"]["decoders"] == ["full"]
    urls = {}
    for decoder in ("tiny", "full"):
        done = api.wait(api.submit(model="fast", prompt="a red fox", seed=9, decoder=decoder, **SMALL)["id"], 90)
        assert done["status"] == "completed", done
        urls[decoder] = api.get(done["url"]).content
    entry = env["args"]["models"][0]
    cfg = json.loads(open(entry["config_json"]).read())
    pipe = WanPipeline.from_pretrained(entry["model_path"], load_run_config(
        {**cfg, **entry["config"], "target_height": 32, "target_width": 48, "target_video_length": 5},
        model_cls="wan2.1_distill"))
    with torch.no_grad(), torch_threads(1):  # as the replica's rank runs (num_threads 1)
        gen = pipe.generate("a red fox", seed=9, decoder="tiny")
    assert urls["tiny"] == encode_mp4([gen.video], pipe.cfg.fps)[0]
    assert urls["tiny"] != urls["full"]
    assert decode(urls["tiny"], tmp_path).shape == (5, 32, 48, 3)


def test_lora_job(api, tmp_path):
    job = api.submit(model="fast", prompt="a red fox", loras=[{"name": "style", "strength": 0.5}], **SMALL)
    done = api.wait(job["id"], 90)
    assert done["status"] == "completed", done
    assert done["loras"] == [{"name": "style", "strength": 0.5}] and "lora_reload" in done["timings"]
    assert decode(api.get(done["url"]).content, tmp_path).shape == (5, 32, 48, 3)
    bad = api.wait(api.submit(model="fast", prompt="a red fox", loras=["broken"], **SMALL)["id"], 90)
    assert bad["status"] == "failed" and "could not be loaded" in bad["error"]["message"], bad
    assert "broken.safetensors" in bad["error"]["message"]
    assert api.wait(api.submit(model="fast", prompt="a red fox", **SMALL)["id"], 90)["status"] == "completed"


# ---- LightX2V routes ----------------------------------------------------------------------------------------------

def test_lightx2v_routes(api, tmp_path):
    r = api.post("/v1/tasks/video", json={"prompt": "a red fox", "target_video_length": 5, "target_height": 32,
                                          "target_width": 48, "infer_steps": 5, "save_result_path": "/etc/x.mp4"})
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["task_status"] == "pending" and task["save_result_path"] == f"{task['task_id']}.mp4"
    st = wait_until(lambda: (s := api.get(f"/v1/tasks/{task['task_id']}/status").json())["status"] in TERMINAL and s,
                    60, "lightx2v task")
    assert st["status"] == "completed"
    res = api.get(f"/v1/tasks/{task['task_id']}/result")
    assert res.status_code == 200 and decode(res.content, tmp_path).shape == (5, 32, 48, 3)
    form = api.post("/v1/tasks/video/form", data={"prompt": "a boat", "model": "i2v", "target_video_length": "5"},
                    files={"image_file": ("b.png", png_bytes(), "image/png")})
    assert form.status_code == 200, form.text
    assert api.get("/v1/tasks").json()[task["task_id"]]["status"] == "completed"
    q = api.get("/v1/tasks/queue/status").json()
    assert q["queue_size"] == 3 and set(q) >= {"is_processing", "pending_count", "queue_available"}
    assert api.get("/v1/service/status").json()["service_status"] in ("busy", "idle")
    assert api.get("/v1/service/metadata").json()["server"] == "wanserve"
    stop = api.delete(f"/v1/tasks/{task['task_id']}").json()
    assert stop["stop_status"] == "do_nothing"
    bad = api.post("/v1/tasks/video", json={"prompt": "x", "image_path": "/etc/passwd", "model": "i2v"})
    assert bad.status_code == 403
    api.wait(form.json()["task_id"], 60)


# ---- clients ---------------------------------------------------------------------------------------------------------

def test_python_clients(env, tmp_path):
    from deployments.client import AsyncWanClient, HandleClient, JobCancelled, WanClient, WanError

    client = WanClient(env["url"], token=TOKEN)
    job = client.generate("a red fox running", model="fast", seed=1, **SMALL)
    done = job.wait(progress=True, timeout=60)
    assert done["status"] == "completed"
    path = job.save(tmp_path / "fox.mp4")
    assert decode(path.read_bytes(), tmp_path).shape == (5, 32, 48, 3)
    i2v = client.generate("a boat", model="i2v", image=png_bytes(), **SMALL)
    assert i2v.wait(timeout=60)["status"] == "completed"
    with pytest.raises(WanError) as err:
        client.generate("x", model="nope")
    assert err.value.status == 400 and "available" in err.value.message
    slow = client.generate("a fox", model="slow", **SMALL)
    slow.cancel()
    with pytest.raises(JobCancelled):
        slow.wait(timeout=30)

    async def run_async():
        async with AsyncWanClient(env["url"], token=TOKEN) as c:
            j = await c.generate("a green square", model="fast", **SMALL)
            await j.wait(timeout=60)
            return await j.content()

    assert decode(asyncio.run(run_async()), tmp_path).shape == (5, 32, 48, 3)

    from ray import serve

    hc = HandleClient(serve.get_app_handle(APP))
    hj = hc.generate("a yellow star", model="fast", **SMALL)
    assert hj.wait(timeout=60)["status"] == "completed"
    assert decode(hj.content(), tmp_path).shape == (5, 32, 48, 3)
    with pytest.raises(WanError) as err:
        hc.generate("x", size="47x32")
    assert err.value.status == 400 and "multiple of 16" in err.value.message


# ---- the OpenAPI spec, fuzzed ------------------------------------------------------------------------------------

def test_openapi_fuzz_no_5xx_no_schema_violation(env):
    """schemathesis: generated requests, valid and invalid, against every documented operation: never a 5xx,
    every answer with a documented status, content type and body schema. Bounded: a few examples per
    operation and mode. (Driven by hand: schemathesis' pytest plugin does not run under pytest 9.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    drain(env["api"])
    schema = schemathesis.openapi.from_url(env["url"] + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ran, statuses = [], Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=5, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(headers=headers, timeout=30)
                statuses[(case.operation.label, response.status_code // 100)] += 1
                case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz takes no input)
                assert mode is GenerationMode.NEGATIVE, op.label
                continue
            ran.append(f"{op.label} {mode.value}")
    assert len(ran) >= 30, ran
    assert statuses[("POST /v1/videos", 2)] and statuses[("POST /v1/videos", 4)], statuses
    assert statuses[("GET /v1/models", 2)] and statuses[("POST /v1/sessions", 4)], statuses


# ---- the web page, in headless Chromium ---------------------------------------------------------------------------

def test_web_page_in_headless_chromium(env, tmp_path):
    """Load /, give the token, submit a prompt through the form, wait until the <video> plays; screenshot
    to out/serve_web.png."""
    from cdp import Browser, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with Browser(tmp_path / "profile") as b:
        b.goto(env["url"] + "/")
        b.wait_for("document.getElementById('auth').open", 15)  # 401 from /v1/models: the page asks for the token
        b.type_into("#token", TOKEN)
        b.js("document.getElementById('token').dispatchEvent(new Event('change'))")
        b.wait_for("document.querySelectorAll('#model option').length === 2", 15)
        b.js("const m = document.getElementById('model'); m.value = 'fast'; m.dispatchEvent(new Event('change'))")
        b.type_into("#prompt", "a red fox running through snow")
        b.type_into("#size", "48x32")
        b.type_into("#frames", "5")
        b.click("#submit")
        job_id = b.wait_for("document.getElementById('job-id').textContent", 15)
        played = b.wait_for("(() => { const v = document.getElementById('video');"
                            " return !v.hidden && (v.currentTime > 0 || v.ended) && v.currentTime; })()", 60)
        assert played > 0
        assert b.js("document.getElementById('video').error") is None
        assert b.js("document.getElementById('video').videoWidth") == 48
        assert "completed" in b.js("document.getElementById('status').textContent")
        row = f"document.querySelector('#jobs tbody tr[data-id=\"{job_id}\"]')"
        b.wait_for(f"({row} || {{textContent: ''}}).textContent.includes('completed')", 10)
        shot = b.screenshot(REPO / "out" / "serve_web.png")
    assert shot.stat().st_size > 5000
    assert env["api"].job(job_id)["status"] == "completed"


# ---- metrics, through Ray's metrics agent ------------------------------------------------------------------------

def _prometheus(port: int) -> dict[tuple[str, frozenset], float]:
    """Samples of the node's Prometheus endpoint: (name, labels) -> value."""
    import re

    import requests

    out = {}
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)", line)
        if m and m.group(1).startswith("ray_wanserve_"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_metrics_exported_through_ray(api):
    """A completed job shows in the node's Prometheus export: wanserve_jobs_total{state=completed} rises by
    at least one per job (`before` may lag by a report interval), the latency histogram has stage samples, the queue-depth gauge exists per model."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port

    def completed(samples) -> float:
        return sum(v for (name, labels), v in samples.items() if name == "ray_wanserve_jobs_total"
                   and ("state", "completed") in labels and ("model", "fast") in labels)

    before = completed(_prometheus(port))
    for _ in range(2):
        assert api.wait(api.submit(model="fast", prompt="a green square", **SMALL)["id"])["status"] == "completed"
    samples = wait_until(lambda: (s := _prometheus(port)) and completed(s) >= before + 2 and s, 60,
                         "the metrics export reporting the two jobs")
    stages = {dict(labels).get("stage") for (name, labels) in samples
              if name == "ray_wanserve_job_latency_seconds_count" and ("model", "fast") in labels}
    assert {"queue", "dit", "vae", "total"} <= stages, stages
    assert any(name == "ray_wanserve_queue_depth" and ("model", "slow") in labels for name, labels in samples)
    kernel = {("model", "fast"), ("attention", "self_attn_1_type"), ("kernel", "torch_sdpa")}
    assert any(name == "ray_wanserve_attention_kernel" and kernel <= labels and v == 1 for (name, labels), v in
               samples.items()), "the attention kernel gauge"
