"""The CausVid session API of SPWorkerGroup, through real Ray actors (the session Ray instance of conftest.py).

Two groups of the tiny CausVid model: SP=2 (Ulysses; rank 0 encodes and decodes, both ranks denoise and
each holds half of every cache) and SP=1. Checked against `CausVidPipeline` in this process: two fragments
of a session equal the one-call `num_fragments: 2` result; blocks stream out through `fragment_blocks`
while `next_fragment` runs; a second session stays independent; offload/reload gives the identical next
fragment; a state restored into the *other* group continues the video (its next fragment; the earlier video
is the router's, on disk); cancel + resume; errors the router maps (unknown id, duplicate id, bad state, a
dead rank); and 50 sessions opened and closed leave nothing behind.
"""
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_dit, torch_threads

from model.causal_pipeline import CausVidPipeline
from model.archs import TINY_T2V
from model.config import load_run_config
from model.pipeline import Cancelled, Request, RequestError
from model.tiny import write_tiny_model
from model.video import to_uint8

PROMPT, OTHER = "a red square moving left", "a blue circle moving right"
WORDS = "a red blue square circle moving left right".split()
CONFIG = {**json.loads((Path(__file__).parent.parent / "configs" / "tiny" / "causvid_t2v.json").read_text()),
          "model_cls": "wan2.1_causvid", "task": "t2v"}
GROUP_OPTIONS = dict(join_timeout=60, op_timeout=120, heartbeat_interval=0.2, stale_after=3)
TOL = 1e-5


def state_latents(state: dict) -> torch.Tensor:
    """The latents a state keeps, in block order (the tiny config has no window: the cache depends on every block,
    so every block's are kept)."""
    lat = state["latents"]
    assert sorted(lat) == list(range(len(lat)))
    return torch.cat([lat[b] for b in sorted(lat)], dim=1)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("sessions"), "t2v", words=WORDS, causal=tiny_dit(TINY_T2V, seed=21))


@pytest.fixture(scope="module")
def reference(model_root):
    """One process, one thread: the one-call result and a session continued to a third fragment."""
    with torch_threads(1):
        pipe = CausVidPipeline.from_pretrained(model_root, load_run_config(CONFIG))
        whole = pipe.generate(PROMPT, seed=3)  # num_fragments: 2 from the config
        s = pipe.start_session(PROMPT, seed=3, history=True)
        for _ in range(3):
            s.next_fragment()
        other = pipe.start_session(OTHER, seed=4, history=True)
        other.next_fragment()
        return {"whole": whole, "video2": to_uint8(whole.video), "video3": s.video(), "latents3": s.latents(),
                "other": other.video()}


def _group(model_root, **parallel):
    from engine.worker_group import SPWorkerGroup

    config = {**CONFIG, "parallel": parallel} if parallel else CONFIG
    return SPWorkerGroup(str(model_root), config, num_cpus=1, num_threads=1, start_timeout=120,
                         group_options=GROUP_OPTIONS)


@pytest.fixture(scope="module")
def groups(ray_session, model_root):
    sp2 = _group(model_root, seq_p_size=2)
    try:
        sp1 = _group(model_root)
    except BaseException:
        sp2.shutdown()
        raise
    yield {"sp2": sp2, "sp1": sp1}
    for g in (sp2, sp1):
        g.shutdown(timeout=20)


def _alive_actor_ids() -> set:
    from ray._private import state  # ray.util.state needs the dashboard, which the test instance does not run

    return {k for k, v in state.actors().items() if v["State"] == "ALIVE"}


def _u8_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference in uint8 levels: the DiT's sums under Ulysses are the single process's, but the split VAE
    (parallel/vae.py, on by default) sums in another order, which may round a pixel the other way."""
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_sessions_on_two_groups(groups, reference):
    from engine.worker_group import InvalidSessionState, SessionExists, SessionNotFound

    g2, g1 = groups["sp2"], groups["sp1"]
    info = g2.open_session("a", PROMPT, seed=3)
    assert (info["fragments"], info["frames"], info["tier"], info["cache_bytes_total"]) == (0, 0, "active", 0)
    assert len(info["cache_bytes_per_rank"]) == 2

    # fragment 1 in the background; its blocks are read while it runs
    result, streamed, live, progress = {}, [], [], []
    worker = threading.Thread(target=lambda: result.update(g2.next_fragment("a", timeout=300)))
    worker.start()
    while worker.is_alive():
        new = g2.fragment_blocks("a", since=len(streamed))
        if new and worker.is_alive():
            live.append(len(streamed) + len(new))
        streamed += new
        p = g2.progress()
        if p and "blocks" in p:
            progress.append((p["blocks"], p["blocks_total"]))
        time.sleep(0.02)
    worker.join()
    streamed += g2.fragment_blocks("a", since=len(streamed))
    assert live, "no block was readable before next_fragment returned"
    assert len(streamed) == 3 and np.array_equal(np.concatenate(streamed), result["frames"])
    assert [b.shape[0] for b in streamed] == [5, 8, 8]
    assert any(done < total for done, total in progress) and progress[-1][1] == 3
    assert (result["fragment"], result["blocks"]) == (0, [0, 3])
    assert {"text", "dit", "vae", "first_block", "total", "communication"} <= set(result["timings"])

    # a second session in between stays independent
    b = g2.open_session("b", OTHER, seed=4)
    assert b["prompt"] == OTHER
    assert _u8_diff(g2.next_fragment("b")["frames"], reference["other"]) <= 1

    second = g2.next_fragment("a")
    video = np.concatenate([result["frames"], second["frames"]])
    assert _u8_diff(video, reference["video2"]) <= 1
    state = g2.session_state("a")
    assert (state_latents(state) - reference["whole"].latents).abs().max().item() <= TOL
    info = g2.session_info("a")
    assert (info["fragments"], info["frames"], info["latent_frames"]) == (2, 45, 12)
    assert info["cache_bytes_per_rank"][0] == info["cache_bytes_per_rank"][1] == info["cache_bytes"] > 0
    # rank 0 keeps the decoded frames of the last fragment only (the router has written the earlier ones out)
    assert second["blocks"] == [3, 6] and np.array_equal(np.concatenate(g2.fragment_blocks("a")), second["frames"])
    assert sorted(s["session_id"] for s in g2.list_sessions()) == ["a", "b"]

    # idle tier and back: the same next fragment
    before = g2.session_stats()
    idle = g2.offload_session("a")
    assert idle["tier"] == "idle" and idle["device"] == "cpu"
    after = g2.session_stats()
    for was, now in zip(before, after):
        assert now["active_bytes"] == was["active_bytes"] - idle["cache_bytes"]
        assert now["idle_bytes"] == idle["cache_bytes"]
    assert g2.reload_session("a")["tier"] == "active"
    third = g2.next_fragment("a")
    assert _u8_diff(third["frames"], reference["video3"][45:]) <= 1
    assert (state_latents(g2.session_state("a")) - reference["latents3"]).abs().max().item() <= TOL

    # the stored state rebuilds the session in another group (here of another size): same next fragment
    restored = g1.restore_session("a", state)
    assert (restored["fragments"], restored["blocks"], restored["partial_blocks"], restored["frames"]) == (2, 6, 0, 45)
    again = g1.next_fragment("a")
    assert (again["fragment"], again["blocks"], len(again["frames"])) == (2, [6, 9], 24)
    assert (again["info"]["fragments"], again["info"]["frames"]) == (3, 69)
    assert _u8_diff(again["frames"], third["frames"]) <= 1
    assert (state_latents(g1.session_state("a")) - reference["latents3"]).abs().max().item() <= TOL

    # what the router maps to 404 / 409 / 400; the group stays healthy
    with pytest.raises(SessionNotFound, match="session 'nope' not found") as err:
        g2.next_fragment("nope")
    assert isinstance(err.value, KeyError)
    with pytest.raises(SessionNotFound):
        g2.session_info("nope")
    with pytest.raises(SessionExists):
        g2.open_session("a", PROMPT)
    with pytest.raises(InvalidSessionState, match="not a CausVid session state"):
        g1.restore_session("c", {"latents": torch.zeros(1)})
    with pytest.raises(RequestError, match="prompt must not be empty"):
        g2.next_fragment("b", prompt=" ")
    assert g2.health()["healthy"] and g1.health()["healthy"]

    assert [g2.close_session(s) for s in ("a", "b", "a")] == [True, True, False]
    assert g1.close_session("a")
    assert g2.list_sessions() == [] and g1.list_sessions() == []
    for stats in g2.session_stats() + g1.session_stats():
        assert (stats["sessions"], stats["tracked_bytes"], stats["live_session_objects"]) == (0, 0, 0)


def test_one_call_run_and_cancel_resume(groups, reference):
    g2, g1 = groups["sp2"], groups["sp1"]
    gen = g2.run(Request(PROMPT, seed=3), timeout=300)  # LightX2V's one call, on a CausVid group
    assert (gen.latents - reference["whole"].latents).abs().max().item() <= TOL
    assert gen.video.shape == reference["whole"].video.shape and gen.nfe == reference["whole"].nfe
    with pytest.raises(RequestError, match="text-to-video only"):
        g2.run(Request(PROMPT, image=np.zeros((48, 32, 3), np.uint8)))

    g1.open_session("c", PROMPT, seed=3)
    outcome = {}

    def first():
        try:
            outcome["result"] = g1.next_fragment("c", timeout=300)
        except Cancelled as e:
            outcome["cancelled"] = str(e)

    worker = threading.Thread(target=first)
    worker.start()
    while worker.is_alive() and (g1.progress() or {}).get("blocks", 0) < 1:
        time.sleep(0.01)
    g1.cancel()
    worker.join()
    assert "cancelled" in outcome, outcome
    kept = g1.session_info("c")
    assert kept["fragments"] == 0 and 1 <= kept["partial_blocks"] < 3
    rest = g1.next_fragment("c")  # the whole fragment, its blocks from before the cancel too
    assert rest["blocks"] == [0, 3] and rest["fragment"] == 0
    last = g1.next_fragment("c")
    assert _u8_diff(np.concatenate([rest["frames"], last["frames"]]), reference["video2"]) <= 1
    assert g1.close_session("c")


def test_fifty_sessions_leave_nothing_behind(groups):
    g = groups["sp2"]
    actors = _alive_actor_ids()
    for i in range(50):
        sid = f"s{i}"
        g.open_session(sid, PROMPT, seed=i)
        if i % 10 == 0:  # some with caches, one of those offloaded
            g.next_fragment(sid)
            assert g.session_info(sid)["cache_bytes_total"] > 0
            if i == 20:
                g.offload_session(sid)
        assert g.close_session(sid)
    assert g.list_sessions() == []
    for stats in g.session_stats():
        assert stats == {"rank": stats["rank"], "sessions": 0, "active_bytes": 0, "idle_bytes": 0, "tracked_bytes": 0,
                         "live_session_objects": 0}
    assert _alive_actor_ids() == actors and g.health()["healthy"]


def test_a_dead_rank_fails_fast_with_rank_failure(groups, ray_session):
    """After the owning actor dies, reads and calls raise RankFailure at once (the router rebuilds or answers
    410), never a hang. Last in the module: it leaves the SP=1 group dead."""
    from parallel.group import RankFailure

    g = groups["sp1"]
    g.open_session("d", PROMPT, seed=1)
    actor = g.actors[0]
    ray_session.kill(actor)
    # ray.kill is asynchronous: a call sent right after it may still be served. Wait until the actor is gone.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray_session.get(actor.__ray_ready__.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - RayActorError once it is dead
            break
        time.sleep(0.1)
    with pytest.raises(RankFailure, match=r"rank 0 .* is dead"):
        g.session_info("d")
    with pytest.raises(RankFailure, match="unhealthy"):
        g.next_fragment("d")
    assert not g.health(timeout=5)["healthy"]
