"""SP=2 on two spawned gloo processes vs the single-process model: DiT forwards (Ulysses, ring, padding,
I2V, per-frame timesteps), FSDP weight sharding, and whole distill generations through ParallelRunner.

One spawn runs every case (spawning costs seconds on two cores); each test below checks one part of its
result against an independent single-process computation. Tolerance: 1e-5 absolute, fp32.
"""
import dataclasses
import sys

import pytest
import torch
from helpers import dit_inputs, tiny_dit

from model.archs import TINY_I2V, TINY_T2V, DiTArch
from model.config import load_run_config
from model.pipeline import Cancelled, Request, RequestError, WanPipeline
from model.tiny import write_tiny_model

ARCH4 = DiTArch(model_type="t2v", in_dim=4, out_dim=4, dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=16,
                num_heads=4, num_layers=2)  # head_dim 16
ARCHS = {"t2v4": (ARCH4, 3), "t2v": (TINY_T2V, 4), "i2v": (TINY_I2V, 5)}  # arch, weight seed
SHAPES = {"even": dict(frames=3, h=8, w=12), "padded": dict(frames=3, h=6, w=10)}  # 72 and 45 tokens
CASES = [("t2v4", "even", False), ("t2v4", "padded", False), ("t2v4", "padded", True), ("t2v", "padded", False),
         ("i2v", "padded", False), ("i2v", "even", False)]
WORDS = "a red blue square circle moving left right".split()
PROMPT = "a red square moving left"
# 9 frames at 48x48: latent 3 x 6 x 6, 27 tokens: SP=2 pads
DISTILL = {"target_video_length": 9, "target_height": 48, "target_width": 48, "enable_cfg": False,
           "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5, "seed": 7}
TOL = 1e-5


def case_inputs(arch_name: str, shape: str, per_frame_t: bool) -> tuple[torch.nn.Module, dict]:
    arch, seed = ARCHS[arch_name]
    kw = dit_inputs(arch, batch=2, **SHAPES[shape])
    if per_frame_t:  # one timestep per latent frame: per-token modulation is sharded too
        kw["t"] = torch.tensor([[999.0, 600.0, 250.0], [500.0, 500.5, 20.0]])
    return tiny_dit(arch, seed), kw


def distill_config(**parallel):
    extra = {"parallel": parallel} if parallel else {}
    return load_run_config({**DISTILL, **extra}, model_cls="wan2.1_distill", task="t2v")


# ---------------------------------------------------------------------------------------------------------
# What each rank runs
# ---------------------------------------------------------------------------------------------------------
def i2v_config(**parallel):
    extra = {"parallel": parallel} if parallel else {}
    return load_run_config({**DISTILL, **extra}, model_cls="wan2.1_distill", task="i2v")


def i2v_image():
    return (torch.arange(40 * 56 * 3) % 251).reshape(40, 56, 3).to(torch.uint8).numpy()  # cropped and resized


def sp2_worker(rank, world_size, addr, port, model_root, i2v_root):
    from parallel.attention import SequenceParallelLayout
    from parallel.fsdp import parameter_bytes, shard_dit
    from parallel.group import GroupLayout, join
    from engine.rank import load_rank_pipeline
    from engine.runner import ParallelRunner

    class UnmaskedLayout(SequenceParallelLayout):  # upstream's behaviour: padded keys attended
        def self_attention(self, q, k, v, kernel=None):
            from parallel.attention import KVSegment
            return self.attn(q, [KVSegment(k, v)])

    out = {"forward": {}, "bytes": {}}
    group = join(rank, world_size, addr, port, GroupLayout(ulysses=2), join_timeout=60, heartbeat_interval=0.2,
                 stale_after=3)
    ring_group = dataclasses.replace(group, ulysses=group.ring, ring=group.ulysses)  # same 2 ranks as a ring
    with group.watch(), torch.no_grad():
        for mode, g in (("ulysses", group), ("ring", ring_group)):
            for case in CASES:
                dit, kw = case_inputs(*case)
                dit.layout = SequenceParallelLayout(g)
                out["forward"][(mode, *case)] = dit(**kw)
                out["bytes"][(mode, *case)] = dit.layout.stats.bytes_sent
        dit, kw = case_inputs("t2v4", "padded", False)
        dit.layout = UnmaskedLayout(group)
        out["unmasked"] = dit(**kw)
        dit, kw = case_inputs("t2v4", "padded", False)
        dit.layout = SequenceParallelLayout(group)
        shard_dit(dit, group)
        out["fsdp_forward"] = dit(**kw)
        out["fsdp_forward_bytes"] = parameter_bytes(dit)

    # whole generations: rank 0 encodes and decodes, both ranks denoise
    from parallel.vae import SplitVAE
    for key, par in (("i2v", {"seq_p_size": 2}), ("gen_rank0_vae", {"seq_p_size": 2, "vae_parallel": False}),
                     ("gen", {"seq_p_size": 2}), ("gen_fsdp", {"seq_p_size": 2, "dit_fsdp": True})):
        cfg, root = (i2v_config(**par), i2v_root) if key == "i2v" else (distill_config(**par), model_root)
        pipe = load_rank_pipeline(root, cfg, rank)
        runner = ParallelRunner(pipe, group)
        steps = []
        image = i2v_image() if key == "i2v" else None
        res = runner.generate(Request(PROMPT, image=image) if rank == 0 else None, progress=steps.append)
        out[key + "_split"] = ({**pipe.vae.calls, "halo": pipe.vae.last_halo_bytes} if isinstance(pipe.vae, SplitVAE)
                               else None)
        out[key] = None if res is None else {"latents": res.latents, "video": res.video, "nfe": res.nfe,
                                             "timings": res.timings}
        out[key + "_steps"] = [(p.stage, p.step) for p in steps]
        out[key + "_bytes"] = parameter_bytes(pipe.dit)
        out[key + "_denoise_only"] = pipe.denoise_only

    # control flow crosses ranks: a rejected request, then a cancel after step 2, then the group still works
    try:
        runner.generate(Request("   ") if rank == 0 else None)
    except RequestError as e:
        out["request_error"] = str(e)
    calls = []
    try:
        runner.generate(Request(PROMPT) if rank == 0 else None,
                        cancel=lambda: calls.append(1) or len(calls) >= 2)
    except Cancelled as e:
        out["cancelled"] = str(e)
    res = runner.generate(Request(PROMPT) if rank == 0 else None)
    out["after"] = None if res is None else res.latents
    # the served path: every rank decodes its band, rank 0 feeds the mp4 encoder as the frames come
    from model.video import encode_mp4
    streamed = runner.generate(Request(PROMPT) if rank == 0 else None, mp4=True)
    out["mp4"] = None if streamed is None else (streamed.mp4, streamed.size, streamed.video)
    out["mp4_ref"] = None if res is None else encode_mp4([res.video], pipe.cfg.fps)[0]
    out["modules"] = {m: m in sys.modules for m in ("xfuser", "yunchang", "flash_attn")}
    out["broken"] = group.broken
    group.close()
    return out


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp_t2v")
    return write_tiny_model(root, "t2v", words=WORDS, distill=tiny_dit(TINY_T2V, seed=11))


@pytest.fixture(scope="module")
def i2v_root(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("sp_i2v"), "i2v", words=WORDS, distill=tiny_dit(TINY_I2V, seed=12))


@pytest.fixture(scope="module")
def ranks(model_root, i2v_root):
    from engine.launch import run_local, values

    return values(run_local(sp2_worker, 2, args=(str(model_root), str(i2v_root)), timeout=240))


@pytest.fixture(scope="module")
def serial(model_root):
    pipe = WanPipeline.from_pretrained(model_root, distill_config())
    return pipe.generate(PROMPT)


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_sp2_forward_equals_single_process(ranks, mode, case):
    dit, kw = case_inputs(*case)
    with torch.no_grad():
        ref = dit(**kw)
    for r, out in enumerate(ranks):
        got = out["forward"][(mode, *case)]
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= TOL, f"rank {r}"


def test_bytes_sent_per_forward(ranks):
    """What each rank sends in one forward (72 tokens, B=2, 4 heads x 16, 2 layers, fp32), in closed form."""
    b, s, h, d, layers, out_ch = 2, 72 // 2, 4, 16, 2, 16  # out_ch = patch 1*2*2 x 4 channels
    local = b * s * h * d * 4  # one [B, s, H, D] tensor
    gather = b * s * out_ch * 4
    ulysses = layers * (3 * local // 2 + local // 2) + gather  # q, k, v in; the output back; U = 2
    ring = layers * 2 * local + gather  # k and v to the neighbour once; R = 2
    for out in ranks:
        assert out["bytes"][("ulysses", "t2v4", "even", False)] == ulysses
        assert out["bytes"][("ring", "t2v4", "even", False)] == ring


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_capacity_model_predicts_bytes_sent(ranks, case):
    """The capacity model's SP volume (capacity/comm.py) against the bytes the gloo run sent: within 5 %."""
    from capacity.comm import sp_bytes_per_forward

    arch = ARCHS[case[0]][0]
    shape = SHAPES[case[1]]
    tokens = arch.num_tokens(shape["frames"], shape["h"], shape["w"])
    for mode, (u, r) in (("ulysses", (2, 1)), ("ring", (1, 2))):
        predicted = sp_bytes_per_forward(arch, tokens, u, r, dtype_bytes=4, gather_bytes=4, batch=2).total
        for out in ranks:
            sent = out["bytes"][(mode, *case)]
            assert abs(sent - predicted) <= 0.05 * sent, (mode, sent, predicted)


def test_padding_must_be_masked(ranks):
    """Control: attending to the padded keys (upstream Wan/xDiT) is visibly wrong on the same case."""
    dit, kw = case_inputs("t2v4", "padded", False)
    with torch.no_grad():
        ref = dit(**kw)
    assert (ranks[0]["unmasked"] - ref).abs().max().item() > 1e-3


def test_fsdp_forward_equals_single_process_with_half_the_weights(ranks):
    dit, kw = case_inputs("t2v4", "padded", False)
    with torch.no_grad():
        ref = dit(**kw)
    for out in ranks:
        assert (out["fsdp_forward"] - ref).abs().max().item() <= TOL
        local, full = out["fsdp_forward_bytes"]
        assert local <= 0.55 * full


def test_distill_generation_sp2_equals_sp1(ranks, serial):
    gen = ranks[0]["gen"]
    assert ranks[1]["gen"] is None and ranks[1]["gen_denoise_only"] and not ranks[0]["gen_denoise_only"]
    assert gen["nfe"] == serial.nfe == 4
    assert (gen["latents"] - serial.latents).abs().max().item() <= TOL
    assert gen["video"].shape == serial.video.shape == (3, 9, 48, 48)
    assert (gen["video"] - serial.video).abs().max().item() <= 1e-4
    assert ranks[0]["gen_steps"] == [("text", 1), ("dit", 1), ("dit", 2), ("dit", 3), ("dit", 4), ("vae", 1)]
    assert ranks[1]["gen_steps"] == []  # progress is rank 0's
    assert {"text", "broadcast", "dit", "vae", "total", "communication"} <= set(gen["timings"])


def test_split_vae_decodes_and_encodes_over_both_ranks(ranks, serial, i2v_root):
    """The default (parallel.vae_parallel) splits the decode over the two ranks, both of which hold a VAE; off,
    rank 0 decodes alone. Same video either way (1e-4, the split's bound). I2V: the first frame's latent is
    encoded split too, and the whole generation equals the single-process one."""
    for r in ranks:  # halo rows sent by each rank
        assert r["gen_split"]["decode"] == 1 and r["gen_split"]["halo"] > 0
        assert r["i2v_split"]["encode"] == 1 and r["i2v_split"]["decode"] == 1
    assert ranks[0]["gen_rank0_vae_split"] is None and ranks[1]["gen_rank0_vae_split"] is None
    assert ranks[1]["gen_rank0_vae"] is None
    assert (ranks[0]["gen_rank0_vae"]["video"] - serial.video).abs().max().item() <= 1e-4
    ref = WanPipeline.from_pretrained(i2v_root, i2v_config()).generate(PROMPT, image=i2v_image())
    got = ranks[0]["i2v"]
    assert got["video"].shape == ref.video.shape == (3, 9, 48, 48)
    assert (got["latents"] - ref.latents).abs().max().item() <= 1e-4
    assert (got["video"] - ref.video).abs().max().item() <= 1e-4


def test_split_decode_streams_the_mp4_on_rank0(ranks):
    """mp4=True (what a served job asks for) under the split VAE: the same file as the split whole decode then
    encoded, rank 0 only, no video tensor."""
    data, size, video = ranks[0]["mp4"]
    assert ranks[1]["mp4"] is None and video is None and size == (9, 48, 48)
    assert data == ranks[0]["mp4_ref"]


def test_fsdp_generation_equals_sp1_and_shards_the_weights(ranks, serial):
    assert (ranks[0]["gen_fsdp"]["latents"] - serial.latents).abs().max().item() <= TOL
    for out in ranks:
        local, full = out["gen_fsdp_bytes"]
        assert local <= 0.55 * full
        assert out["gen_bytes"][0] == out["gen_bytes"][1]  # without dit_fsdp every rank holds everything


def test_request_errors_and_cancel_reach_every_rank(ranks, serial):
    assert ranks[0]["request_error"] == ranks[1]["request_error"] == "prompt must not be empty"
    assert ranks[0]["cancelled"] == ranks[1]["cancelled"] == "cancelled after step 2 of 4"
    assert (ranks[0]["after"] - serial.latents).abs().max().item() <= TOL  # the group is still usable
    assert ranks[0]["broken"] is None and ranks[1]["broken"] is None


def test_cpu_path_imports_no_cuda_libraries(ranks):
    for out in ranks:
        assert out["modules"] == {"xfuser": False, "yunchang": False, "flash_attn": False}
