"""The Serve app's parts that need no cluster: args validation, deployment options, the session policy,
the autoscaling policy, the job store's dispatch helpers, session state files, progress weighting."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from serve_support import DISTILL_CFG, REPO

from deployments.config import ArgsError, parse_args, retry_after_s
from model.config import parse_size
from deployments.states import JobState
from deployments.storage.jobs import JobStore
from deployments.policy import backlog_policy
from deployments.router.jobs import overall_percent
from deployments.storage.sessions import SessionStore, new_session_id
from deployments.replica.sessions import SessionManager

BASE = {"state_dir": "/tmp/x", "models": [{"name": "m", "model_path": "/models/m", "model_cls": "wan2.1_distill",
                                            "task": "t2v", "config_json": DISTILL_CFG}]}


def with_(**changes):
    args = copy.deepcopy(BASE)
    for k, v in changes.items():
        if k.startswith("model_"):
            args["models"][0][k[6:]] = v
        else:
            args[k] = v
    return args


# ---- args --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (with_(stat_dir="/x"), "stat_dir: unknown key"),
    ({"models": BASE["models"]}, "state_dir: Field required"),
    (with_(models=BASE["models"] * 2), "model names must be unique"),
    (with_(model_num_replicas=2, model_autoscaling={"min_replicas": 1, "max_replicas": 2}), "not both"),
    (with_(model_model_cls="wan2.1_causvid", model_task="i2v"), "text-to-video only"),
    (with_(model_name="Bad Name"), "models.0.name = 'Bad Name'"),
    (with_(model_autoscaling={"min_replicas": 3, "max_replicas": 2}), "must be >= min_replicas"),
    (with_(max_queued_jobs=0), "max_queued_jobs = 0"),
    (with_(auth_token_env="lower"), "auth_token_env = 'lower'"),
    (with_(limits={"max_frame": 3}), "limits.max_frame: unknown key"),
])
def test_bad_args_say_which_key(args, says):
    with pytest.raises(ArgsError) as err:
        parse_args(args)
    assert says in str(err.value), str(err.value)


def test_build_app_checks_configs_and_deployment_options():
    from deployments.app import build_app
    from deployments.replica.deployment import generator_deployment

    with pytest.raises(ArgsError, match="config file not found"):
        build_app(with_(model_config_json="configs/none.json"))
    with pytest.raises(ArgsError, match="sp_size = 2 but its config's parallel block makes 1"):
        build_app(with_(model_sp_size=2, model_config={"parallel": {"seq_p_size": 1}}))
    args = parse_args(with_(model_sp_size=4, model_device="cuda",
                            model_autoscaling={"min_replicas": 1, "max_replicas": 3}))
    d = generator_deployment(args.models[0])
    assert d.name == "Generator-m"
    cfg = d._replica_config
    assert cfg.placement_group_bundles == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1}] * 4
    assert cfg.placement_group_strategy == "STRICT_PACK"
    dc = d._deployment_config
    assert dc.max_ongoing_requests == 8 and dc.autoscaling_config.max_replicas == 3
    assert dc.autoscaling_config.policy.policy_function == "deployments.policy:backlog_policy"
    assert "PinnedRouter" in str(dc.request_router_config.request_router_class)
    app = build_app(BASE)  # the graph: one Router ingress bound to one generator deployment per model
    router = app._bound_deployment
    assert router.name == "Router" and router.num_replicas == 1 and router.ray_actor_options["num_cpus"] == 0
    (args,) = router.init_args
    assert args["models"][0]["name"] == "m" and args["state_dir"] == "/tmp/x"
    assert {k: v._bound_deployment.name for k, v in router.init_kwargs.items()} == {"m": "Generator-m"}


@pytest.mark.parametrize("name", ["demo", "wan21-14b"])
def test_serve_config_args_validate(name):
    cfg = yaml.safe_load((REPO / "configs" / "serve" / f"{name}.yaml").read_text())
    args = parse_args(cfg["applications"][0]["args"])
    assert args.models and all(m.config_json.startswith("configs/") for m in args.models)


def test_sizes_and_retry_after():
    assert parse_size("832x480") == (480, 832) and parse_size(" 48 X 32 ") == (32, 48)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("480p")
    assert retry_after_s(10, 2, 4.0) == 5 and retry_after_s(0, 0, None) >= 1


# ---- the replica's session policy ------------------------------------------------------------------------------

class FakeGroup:
    """The SPWorkerGroup session calls, with sizes the test sets."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}
        self.calls: list[tuple] = []

    def open_session(self, sid, prompt, seed=None, height=None, width=None):
        self.sessions[sid] = {"cache_bytes": 100, "tier": "active"}
        self.calls.append(("open", sid))

    def restore_session(self, sid, state, replace=False):
        self.sessions[sid] = {"cache_bytes": state["bytes"], "tier": "active"}
        self.calls.append(("restore", sid))

    def session_info(self, sid):
        if sid not in self.sessions:
            raise KeyError(sid)
        return dict(self.sessions[sid])

    def offload_session(self, sid):
        self.sessions[sid]["tier"] = "idle"
        self.calls.append(("offload", sid))

    def reload_session(self, sid):
        self.sessions[sid]["tier"] = "active"
        self.calls.append(("reload", sid))

    def close_session(self, sid):
        self.calls.append(("close", sid))
        return self.sessions.pop(sid, None) is not None


def manager(**settings):
    from deployments.config import SessionSettings

    clock = SimpleNamespace(t=0.0)
    group = FakeGroup()
    s = SessionSettings(**{"ttl_s": 100, "idle_after_s": 10, "max_device_bytes": 250, "max_idle_bytes": 250,
                           "max_sessions": 10, **settings})
    return SessionManager(group, s, clock=lambda: clock.t), group, clock


def test_session_policy_idle_tier_ttl_and_caps():
    mgr, group, clock = manager()
    for i, sid in enumerate("abc"):
        clock.t = i
        mgr.open(sid, "p", 1, 32, 48)
        mgr.used(sid)
    # 300 active bytes > 250: the least recently used goes to the idle tier, the newest never
    assert mgr.tier("a") == "idle" and mgr.tier("c") == "active"
    assert mgr.summary() == {"sessions": 3, "device_bytes": 200, "idle_bytes": 100, "idle_sessions": 1, "evicted": 0}
    clock.t = 5
    mgr.ready("a")  # used again: reloaded and most recent
    assert group.sessions["a"]["tier"] == "active" and list(mgr.entries)[-1] == "a"
    # idle_after_s: b and c idle 10 s -> offloaded by the sweep; a was just used
    clock.t = 12.5
    mgr.sweep()
    assert (mgr.tier("a"), mgr.tier("b"), mgr.tier("c")) == ("active", "idle", "idle")
    # the idle tier is capped too: 4 idle sessions of 100 > 250 -> the oldest idle ones are closed
    mgr.open("d", "p", 1, 32, 48)
    mgr.offload("a")
    mgr.offload("d")
    closed = mgr.enforce()
    assert closed == ["b", "c"] and "b" not in group.sessions and mgr.evicted == 2
    # TTL closes whatever sat unused for ttl_s
    clock.t = 200
    assert sorted(mgr.sweep()) == ["a", "d"] and len(mgr) == 0 and not group.sessions


def test_session_policy_max_sessions_restore_and_forget():
    mgr, group, clock = manager(max_sessions=2, max_device_bytes=10**9)
    mgr.open("a", "p", 1, 32, 48)
    clock.t = 1
    mgr.open("b", "p", 1, 32, 48)
    clock.t = 2
    mgr.restore("c", {"bytes": 50})  # a third session: the least recently used is closed first
    assert sorted(mgr.entries) == ["b", "c"] and ("close", "a") in group.calls
    assert mgr.entries["c"].cache_bytes == 50
    assert mgr.close("b") and not mgr.close("zz")
    assert mgr.forget_all() == ["c"] and len(mgr) == 0


# ---- autoscaling ---------------------------------------------------------------------------------------------------

def ctx(busy, backlog, current, now, state=None, lo=1, hi=4):
    rid = iter(range(100))
    return SimpleNamespace(
        config=SimpleNamespace(target_ongoing_requests=1, upscale_delay_s=5, downscale_delay_s=60),
        policy_state=state or {}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        target_num_replicas=current, current_time=now,
        aggregated_metrics={"busy": {next(rid): b for b in busy}, "backlog": {next(rid): backlog for _ in busy}})


def test_backlog_policy_scales_on_the_routers_queue():
    n, st = backlog_policy(ctx([1], 3, current=1, now=0))
    assert n == 1  # demand of 4 replicas, but not for upscale_delay_s yet
    n, st = backlog_policy(ctx([1], 3, current=1, now=6, state=st))
    assert n == 4
    n, st = backlog_policy(ctx([1, 1, 1, 1], 10, current=4, now=7, state=st))
    assert n == 4  # max_replicas
    n, st = backlog_policy(ctx([0, 0, 0, 0], 0, current=4, now=10, state=st))
    assert n == 4
    n, st = backlog_policy(ctx([0, 0, 0, 0], 0, current=4, now=71, state=st))
    assert n == 1  # min_replicas after downscale_delay_s of no demand


# ---- job store helpers, session states, progress -------------------------------------------------------------------

def test_claim_skips_busy_sessions(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "results")
    a1 = store.create("m", {}, "fragment", "ses_a")
    a2 = store.create("m", {}, "fragment", "ses_a")
    v = store.create("m", {})
    assert store.queued_sessions("m") == {"ses_a"}
    assert store.claim_next(["m"], skip_sessions={"ses_a"}).id == v.id
    assert store.claim_next(["m"]).id == a1.id
    assert [j.id for j in store.session_jobs("ses_a")] == [a1.id, a2.id]
    job = store.progress(a1.id, 3, 4, "dit", percent=40)
    assert job.progress == 40 and job.step == 3 and job.total == 4
    assert store.progress(a1.id, 4, 4, "dit", percent=120).progress == 99
    assert store.get(a2.id).state is JobState.queued


def test_session_state_files_round_trip(tmp_path):
    store = SessionStore(tmp_path)
    sid = new_session_id()
    store.create(sid, "m", "a fox", 3, 32, 48, "r1", {"fragments": 0})
    state = {"latents": torch.randn(4, 2, 4, 6), "rng": torch.ByteTensor(16).random_(), "prompt": "a fox",
             "fragments": 2}
    store.save_state(sid, state)
    back = store.load_state(sid)
    assert torch.equal(back["latents"], state["latents"]) and back["fragments"] == 2
    store.update(sid, replica="r2", fragments=2, info={"frames": 45})
    row = store.get(sid)
    assert row["replica"] == "r2" and row["info"] == {"frames": 45} and row["status"] == "active"
    store.drop_state(sid)
    assert store.load_state(sid) is None
    with pytest.raises(ValueError):
        store.state_path("../../etc/passwd")
    assert store.expired(0, now=row["last_used"] + 1) == [sid]


def test_overall_progress_is_monotone_over_a_job():
    steps = [("text", 1, 1)] + [("dit", i, 4) for i in range(1, 5)] + [("vae", 1, 1)]
    pct = [overall_percent("video", *s) for s in steps]
    assert pct == sorted(pct) and pct[0] > 0 and pct[-1] < 100
    frag = [overall_percent("fragment", "dit", i, 30) for i in range(1, 31)]
    assert frag == sorted(frag) and overall_percent("fragment", "vae", 1, 3) == 0


def test_client_error_carries_the_servers_message():
    from deployments.client.http import _error

    e = _error(429, {"Retry-After": "7"}, b'{"error": {"message": "the queue is full", "code": "queue_full"}}')
    assert e.status == 429 and e.message == "the queue is full" and e.code == "queue_full" and e.retry_after == 7
    e = _error(502, {}, b"<html>bad gateway</html>")
    assert e.status == 502 and "bad gateway" in e.message


def test_web_page_files_exist():
    web = Path(REPO / "deployments" / "web")
    html = (web / "index.html").read_text()
    for ref in ("/web/app.js", "/web/style.css", 'id="video"', 'id="prompt"', 'id="jobs"'):
        assert ref in html
    assert (web / "app.js").is_file() and (web / "style.css").is_file()
