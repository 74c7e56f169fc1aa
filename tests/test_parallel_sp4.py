"""Four spawned gloo processes: Ulysses 2 x ring 2 DiT forwards and CausVid generation, and CFG parallel x
SP=2 base generation (UniPC + CFG), each against the single-process computation (1e-5 absolute, fp32).

One spawn runs all three: the ranks form a u2 x r2 group, check the forwards, generate two CausVid fragments
block by block (the hybrid cache: each rank caches its ring member's token chunk of every block for its
half of the heads; padded blocks, a window cutting through blocks, a sink), leave it, and form a
cfg 2 x ring 2 group for the base generation.
"""
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_dit, torch_threads
from test_causal_sp import OTHER, causvid_config
from test_parallel_sp import PROMPT, WORDS, case_inputs

from model.causal_pipeline import CausVidPipeline
from model.archs import TINY_T2V
from model.config import load_run_config
from model.pipeline import Request, WanPipeline
from model.tiny import write_tiny_model

CASES = [("t2v4", "even", False), ("t2v4", "padded", False), ("t2v4", "padded", True), ("i2v", "padded", False)]
# base sampler, 4 UniPC steps with CFG; 9 frames at 48x48 = 27 tokens: SP=2 pads
BASE = {"target_video_length": 9, "target_height": 48, "target_width": 48, "infer_steps": 4, "sample_shift": 5,
        "sample_guide_scale": 5.0, "enable_cfg": True, "seed": 3}
TOL = 1e-5


def base_config(**parallel):
    extra = {"parallel": parallel} if parallel else {}
    return load_run_config({**BASE, **extra}, model_cls="wan2.1", task="t2v")


def sp4_worker(rank, world_size, addr, port, model_root, port2):
    from parallel.attention import SequenceParallelLayout
    from parallel.group import GroupLayout, join
    from engine.rank import load_rank_pipeline
    from engine.runner import ParallelRunner

    out = {"forward": {}}
    opts = dict(join_timeout=60, heartbeat_interval=0.2, stale_after=3)
    group = join(rank, world_size, addr, port, GroupLayout(ulysses=2, ring=2), **opts)
    out["u2r2_groups"] = (group.ulysses.ranks, group.ring.ranks)
    with group.watch(), torch.no_grad():
        for case in CASES:
            dit, kw = case_inputs(*case)
            dit.layout = SequenceParallelLayout(group)
            out["forward"][case] = dit(**kw)
    from engine.causal_runner import CausalRunner

    cfg = causvid_config("padded_window", seq_p_size=4, ulysses_degree=2, ring_degree=2)
    causal = CausalRunner(load_rank_pipeline(model_root, cfg, rank), group)
    causal.open("s", PROMPT, 5, history=True)  # the whole latents are compared below
    frames = [causal.next_fragment("s"), causal.next_fragment("s", prompt=OTHER)]
    out["causvid"] = {"latents": causal.sessions["s"].session.latents(),
                      "frames": None if rank else [f["frames"] for f in frames]}
    group.close()

    cfg = base_config(seq_p_size=2, seq_p_attn_type="ring", cfg_p_size=2)
    group = join(rank, world_size, addr, port2, GroupLayout.from_parallel(cfg.parallel), **opts)
    out["cfg_groups"] = (group.sp.ranks, group.cfg.ranks)
    runner = ParallelRunner(load_rank_pipeline(model_root, cfg, rank), group)
    res = runner.generate(Request(PROMPT) if rank == 0 else None)
    out["gen"] = None if res is None else {"latents": res.latents, "nfe": res.nfe, "video": res.video}
    out["modules"] = {m: m in sys.modules for m in ("xfuser", "yunchang")}
    group.close()
    return out


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("sp4_t2v"), "t2v", words=WORDS, seed=5,
                            causal=tiny_dit(TINY_T2V, seed=21))


@pytest.fixture(scope="module")
def ranks(model_root):
    from parallel.group import free_port
    from engine.launch import run_local, values

    return values(run_local(sp4_worker, 4, args=(str(model_root), free_port()), timeout=240))


def test_group_membership(ranks):
    assert [r["u2r2_groups"] for r in ranks] == [([0, 1], [0, 2]), ([0, 1], [1, 3]), ([2, 3], [0, 2]),
                                                 ([2, 3], [1, 3])]
    assert [r["cfg_groups"] for r in ranks] == [([0, 1], [0, 2]), ([0, 1], [1, 3]), ([2, 3], [0, 2]),
                                                ([2, 3], [1, 3])]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ulysses2_x_ring2_forward_equals_single_process(ranks, case):
    dit, kw = case_inputs(*case)
    with torch.no_grad():
        ref = dit(**kw)
    for r, out in enumerate(ranks):
        assert (out["forward"][case] - ref).abs().max().item() <= TOL, f"rank {r}"


def test_cfg_parallel_x_sp2_equals_serial_base_sampler(ranks, model_root):
    serial = WanPipeline.from_pretrained(model_root, base_config()).generate(PROMPT)
    gen = ranks[0]["gen"]
    assert all(r["gen"] is None for r in ranks[1:])
    assert gen["nfe"] == serial.nfe == 8  # 4 steps x (cond + uncond)
    assert (gen["latents"] - serial.latents).abs().max().item() <= TOL
    assert (gen["video"] - serial.video).abs().max().item() <= 1e-4
    assert all(not any(r["modules"].values()) for r in ranks)


def test_causvid_ulysses2_x_ring2_equals_sp1(ranks, model_root):
    with torch_threads(1):
        pipe = CausVidPipeline.from_pretrained(model_root, causvid_config("padded_window"))
        s = pipe.start_session(PROMPT, seed=5, history=True)
        s.next_fragment()
        s.next_fragment(prompt=OTHER)
    for r, out in enumerate(ranks):
        assert (out["causvid"]["latents"] - s.latents()).abs().max().item() <= TOL, f"rank {r}"
    video = np.concatenate(ranks[0]["causvid"]["frames"])
    assert video.shape == s.video().shape
    assert np.abs(video.astype(int) - s.video().astype(int)).max() <= 1
