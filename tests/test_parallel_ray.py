"""SPWorkerGroup: two Ray actors pinned to placement-group bundles form an SP=2 group and generate the same
latents as one process (1e-5); request errors pass through (and the session API refuses a non-CausVid
group); a killed actor is named and the group turns unhealthy. Uses the session Ray instance of
conftest.py. (CausVid sessions: test_parallel_sessions.py.)"""
import pytest
from helpers import tiny_dit

from model.archs import TINY_T2V
from model.config import load_run_config
from model.pipeline import Request, RequestError, WanPipeline

CONFIG = {"model_cls": "wan2.1_distill", "task": "t2v", "target_video_length": 9, "target_height": 48,
          "target_width": 48, "enable_cfg": False, "denoising_step_list": [1000, 750, 500, 250], "seed": 7}
PROMPT = "a blue circle moving right"


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    from model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ray_t2v"), "t2v", words=PROMPT.split(),
                            distill=tiny_dit(TINY_T2V, seed=21))


def test_worker_group_in_placement_group(ray_session, model_root):
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group

    from parallel.group import RankFailure
    from engine.worker_group import SessionsNotSupported, SPWorkerGroup

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    group = SPWorkerGroup(str(model_root), {**CONFIG, "parallel": {"seq_p_size": 2}}, placement_group=pg,
                          num_cpus=1, num_threads=1, start_timeout=120,
                          group_options=dict(join_timeout=60, op_timeout=60, heartbeat_interval=0.2, stale_after=2))
    try:
        health = group.health()
        assert health["healthy"], health
        assert [(r["rank"], r["joined"], r["backend"]) for r in health["ranks"]] == [(0, True, "gloo"), (1, True, "gloo")]
        assert len({r["pid"] for r in health["ranks"]}) == 2

        gen = group.run(Request(PROMPT), timeout=120)
        serial = WanPipeline.from_pretrained(model_root, load_run_config(CONFIG)).generate(PROMPT)
        assert (gen.latents - serial.latents).abs().max().item() <= 1e-5
        assert (gen.video - serial.video).abs().max().item() <= 1e-4
        assert group.progress() == {"stage": "vae", "step": 1, "total": 1}

        with pytest.raises(RequestError, match="prompt must not be empty"):
            group.run(Request(""), timeout=60)
        with pytest.raises(SessionsNotSupported, match="sessions need a CausVid model"):  # never reaches the actors
            group.open_session("s", PROMPT)
        assert group.health()["healthy"]

        ray.kill(group.actors[1])
        with pytest.raises(RankFailure, match=r"rank\(s\) \[1\]") as err:
            group.run(Request(PROMPT), timeout=60)
        assert err.value.ranks == [1]
        health = group.health(timeout=5)
        assert not health["healthy"] and "error" in health["ranks"][1]
        with pytest.raises(RankFailure, match="unhealthy"):
            group.run(Request(PROMPT))
    finally:
        group.shutdown(timeout=20)
        remove_placement_group(pg)
