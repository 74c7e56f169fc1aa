"""End-to-end generation on tiny model folders: T2V/I2V, base/distill, determinism, NFE, cancel, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import dit_inputs, tiny_dit
from safetensors.torch import save_file

from model.archs import TINY_I2V, TINY_T2V
from model.checkpoint import CheckpointError, load_state_dict
from model.config import ConfigError, load_run_config
from model.dit import WanModel
from model.pipeline import Cancelled, Request, RequestError, WanPipeline, check_prompt, i2v_mask
from model.quant import QuantLinear
from model.tiny import write_tiny_model
from model.video import read_mp4

WORDS = "a red blue green square circle moving left right on background".split()
SMALL = {"target_video_length": 5, "target_height": 32, "target_width": 48}
DISTILL = {**SMALL, "enable_cfg": False, "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5}
BASE = {**SMALL, "infer_steps": 6, "sample_shift": 5, "sample_guide_scale": 5, "enable_cfg": True}
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def t2v_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    return write_tiny_model(root, "t2v", words=WORDS, distill=tiny_dit(TINY_T2V, seed=11))


@pytest.fixture(scope="module")
def i2v_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    return write_tiny_model(root, "i2v", words=WORDS, distill=tiny_dit(TINY_I2V, seed=12))


def pipe_for(root, model_cls, cfg, task="t2v"):
    return WanPipeline.from_pretrained(root, load_run_config(cfg, model_cls=model_cls, task=task))


class CountingDiT(torch.nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.inner, self.calls, self.timesteps = dit, 0, []

    def forward(self, *a, **kw):
        self.calls += 1
        self.timesteps.append(float(a[1][0]))
        return self.inner(*a, **kw)


def test_distill_t2v_four_steps_matches_formula(t2v_root, tmp_path):
    pipe = pipe_for(t2v_root, "wan2.1_distill", DISTILL)
    counting = CountingDiT(pipe.dit)
    pipe.dit = counting
    out = pipe.generate("a red square moving left", seed=7)
    assert out.nfe == 4 and counting.calls == 4
    assert counting.timesteps == pytest.approx([1000.0, 937.5, 833.3333333, 625.0])
    # independent loop: LightX2V's step semantics written out with the raw model
    cond = pipe.encode(pipe.check(Request("a red square moving left", seed=7)))
    shift = 5.0
    sig = [shift * u / (1 + (shift - 1) * u) for u in (1.0, 0.75, 0.5, 0.25)]
    x = cond.noise
    with torch.no_grad():
        for i, s in enumerate(sig):
            v = counting.inner(x, torch.tensor([s * 1000]), cond.context)
            x0 = x - s * v
            x = x0 + sig[i + 1] * v if i + 1 < len(sig) else x0
    assert (out.latents - x[0]).abs().max().item() <= 1e-5
    # the mp4 decodes back to the requested frames and size
    frames, fps = read_mp4(out.save(tmp_path / "d.mp4"))
    assert frames.shape == (5, 32, 48, 3) and fps == 16


def test_base_t2v_cfg_counts_and_determinism(t2v_root):
    pipe = pipe_for(t2v_root, "wan2.1", BASE)
    a = pipe.generate("a blue circle moving right", seed=3)
    b = pipe.generate("a blue circle moving right", seed=3)
    c = pipe.generate("a blue circle moving right", seed=4)
    assert a.nfe == 12  # 6 steps x (cond + uncond)
    assert torch.equal(a.video, b.video)
    assert not torch.equal(a.video, c.video)
    assert a.video.shape == (3, 5, 32, 48)
    assert set(a.timings) >= {"text", "dit", "vae", "total"}


def test_fresh_noise_mode_is_seeded(t2v_root):
    pipe = pipe_for(t2v_root, "wan2.1_distill", {**DISTILL, "renoise": "fresh_noise"})
    a = pipe.generate("a red square", seed=1)
    b = pipe.generate("a red square", seed=1)
    det = pipe_for(t2v_root, "wan2.1_distill", DISTILL).generate("a red square", seed=1)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, det.latents)


def test_i2v_distill_end_to_end(i2v_root, tmp_path):
    pipe = pipe_for(i2v_root, "wan2.1_distill", DISTILL, task="i2v")
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, :48] = (255, 0, 0)
    out = pipe.generate("a red square", image=img, seed=5, frames=9)
    assert out.nfe == 4 and out.video.shape == (3, 9, 32, 48)
    assert "image" in out.timings
    again = pipe.generate("a red square", image=img, seed=5, frames=9)
    assert torch.equal(out.video, again.video)
    other = img.copy()
    other[:, :48] = (0, 0, 255)
    assert not torch.equal(out.video, pipe.generate("a red square", image=other, seed=5, frames=9).video)
    frames, _ = read_mp4(out.save(tmp_path / "i.mp4"))
    assert frames.shape == (9, 32, 48, 3)


def test_i2v_mask_layout():
    m = i2v_mask(9, 2, 3)  # 9 pixel frames -> 3 latent frames
    assert m.shape == (4, 3, 2, 3)
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()


def test_cancel_stops_within_one_step(t2v_root):
    pipe = pipe_for(t2v_root, "wan2.1", BASE)
    counting = CountingDiT(pipe.dit)
    pipe.dit = counting
    steps = []
    with pytest.raises(Cancelled):
        pipe.generate("a red square", progress=lambda p: steps.append(p.step) if p.stage == "dit" else None,
                      cancel=lambda: len(steps) >= 2)
    assert steps == [1, 2] and counting.calls == 4  # two steps of cond + uncond, then stop


def test_progress_rises(t2v_root):
    pipe = pipe_for(t2v_root, "wan2.1_distill", DISTILL)
    events = []
    pipe.generate("a red square", progress=events.append)
    dit = [e.step for e in events if e.stage == "dit"]
    assert dit == [1, 2, 3, 4] and events[0].stage == "text" and events[-1].stage == "vae"


@pytest.mark.parametrize("kw,msg", [
    (dict(frames=8), "4n\\+1"),
    (dict(height=40), "multiple of 16"),
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt="x" * 5000), "at most 4096"),
    (dict(image=np.zeros((8, 8, 3), np.uint8)), "text-to-video"),
])
def test_bad_requests(t2v_root, kw, msg):
    pipe = pipe_for(t2v_root, "wan2.1_distill", DISTILL)
    args = {"prompt": "a red square", **kw}
    with pytest.raises(RequestError, match=msg):
        pipe.generate(**args)


def test_check_prompt_rules():
    assert check_prompt("a cat", 5) == "a cat"  # exactly at the limit
    for bad, msg in [("", "prompt must not be empty"), (" \n\t", "prompt must not be empty"),
                     ("abcdef", "prompt is 6 characters; at most 5"), (None, "prompt must be a string, got NoneType"),
                     (["a"], "prompt must be a string, got list")]:
        with pytest.raises(RequestError, match=msg):
            check_prompt(bad, 5)
    with pytest.raises(RequestError, match="negative_prompt must not be empty"):
        check_prompt("", 5, "negative_prompt")


def test_configured_prompt_limit(t2v_root):
    """max_prompt_chars is the limit WanPipeline.check applies (the Serve app passes its own in)."""
    pipe = pipe_for(t2v_root, "wan2.1_distill", {**DISTILL, "max_prompt_chars": 8})
    assert pipe.check(Request("12345678")).prompt == "12345678"
    with pytest.raises(RequestError, match="prompt is 9 characters; at most 8"):
        pipe.check(Request("123456789"))
    with pytest.raises(ConfigError, match="max_prompt_chars = 0"):
        load_run_config({"max_prompt_chars": 0})


def test_i2v_needs_image(i2v_root):
    pipe = pipe_for(i2v_root, "wan2.1_distill", DISTILL, task="i2v")
    with pytest.raises(RequestError, match="needs an image"):
        pipe.generate("a red square")


def test_task_must_match_model(t2v_root):
    with pytest.raises(ConfigError, match="holds a T2V DiT"):
        pipe_for(t2v_root, "wan2.1_distill", DISTILL, task="i2v")


def test_missing_distill_file(tmp_path):
    root = write_tiny_model(tmp_path / "m", "t2v", words=WORDS)
    with pytest.raises(CheckpointError, match="distill_models/distill_model.safetensors"):
        pipe_for(root, "wan2.1_distill", DISTILL)


def test_lora_configs_load_base_and_merge(t2v_root, tmp_path):
    """Non-empty lora_configs: the base DiT plus the LoRA, not distill_models/."""
    base = pipe_for(t2v_root, "wan2.1", BASE).dit
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 48, generator=g), torch.randn(48, 4, generator=g)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b}, str(t2v_root / "lora.safetensors"))
    cfg = {**DISTILL, "lora_configs": [{"path": "lora.safetensors", "strength": 0.5}]}
    merged = pipe_for(t2v_root, "wan2.1_distill", cfg).dit
    want = base.blocks[0].self_attn.q.weight + 0.5 * b @ a
    assert torch.allclose(merged.blocks[0].self_attn.q.weight, want, atol=1e-6)
    assert torch.equal(merged.blocks[1].ffn[0].weight, base.blocks[1].ffn[0].weight)


def test_quantized_on_load(t2v_root):
    """dit_quantized without a pre-quantized file: the student's block linears quantized on load. Its forward
    equals the same weights dequantized into a plain fp32 DiT (CPU dequantizes q * scale in fp32, so the
    stated tolerance, 1e-6 absolute, is float summation order at most), the codes are the per-row formula
    of the student file, and the output stays within the int8 bound of tests/test_quant.py (2e-2 rel-L2)."""
    pipe = pipe_for(t2v_root, "wan2.1_distill", {**DISTILL, "dit_quantized": True, "dit_quant_scheme": "int8-vllm"})
    arch = pipe.dit.arch
    student = load_state_dict(t2v_root / "distill_models" / "distill_model.safetensors")
    layers = {n: m for n, m in pipe.dit.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 10 * arch.num_layers
    dequantized = WanModel(arch)
    sd = {k: v.float() for k, v in pipe.dit.state_dict().items() if not k.endswith(".weight_scale")}
    for name, m in layers.items():
        w = student[f"{name}.weight"]
        s = torch.clamp(w.abs().amax(dim=1, keepdim=True), min=1e-5) / 127
        assert torch.equal(m.weight, torch.clamp(torch.round(w / s), -127, 127).to(torch.int8)), name
        sd[f"{name}.weight"] = m.weight.float() * m.weight_scale
    dequantized.load_state_dict(sd)
    plain = WanModel(arch)
    plain.load_state_dict(student)
    kw = dit_inputs(arch)
    with torch.no_grad():
        out, ref, full = pipe.dit(**kw), dequantized(**kw), plain(**kw)
    assert (out - ref).abs().max().item() <= 1e-6
    assert 0 < ((out - full).norm() / full.norm()).item() < 2e-2
    assert pipe.generate("a red square", seed=1).video.shape == (3, 5, 32, 48)


def test_encoders_quantized_on_load(i2v_root):
    """t5_quantized / clip_quantized are honoured: the encoders' block linears are 8-bit (their numerics:
    tests/test_encoders.py) and a config naming a pre-quantized encoder file is refused, not ignored."""
    cfg = {**DISTILL, "t5_quantized": True, "t5_quant_scheme": "fp8-sgl", "clip_quantized": True,
           "clip_quant_scheme": "int8-vllm"}
    pipe = pipe_for(i2v_root, "wan2.1_distill", cfg, task="i2v")
    t5 = [m.scheme for m in pipe.text_encoder.model.modules() if isinstance(m, QuantLinear)]
    clip = [m.scheme for m in pipe.image_encoder.model.modules() if isinstance(m, QuantLinear)]
    assert t5 == ["fp8"] * 14 and clip == ["int8"] * 12  # tiny umT5: 2 blocks x 7; tiny CLIP: 2 blocks x 6
    assert not any(isinstance(m, QuantLinear) for m in pipe.dit.modules())
    assert pipe.generate("a red square", image=np.full((32, 48, 3), 90, np.uint8)).video.shape == (3, 5, 32, 48)
    for bad, msg in [({"t5_quantized": True}, "t5_quantized = true: needs t5_quant_scheme"),
                     ({"clip_quant_scheme": "int8"}, "clip_quant_scheme = 'int8': set clip_quantized = true"),
                     ({"t5_quantized_ckpt": "t5.safetensors"}, "pre-quantized T5 files are not supported")]:
        with pytest.raises(ConfigError, match=msg):
            load_run_config({**DISTILL, **bad}, model_cls="wan2.1_distill")


# --- the CLI ---------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "model.generate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_t2v_and_i2v(t2v_root, i2v_root, tmp_path):
    cfg = tmp_path / "distill.json"
    cfg.write_text(json.dumps(DISTILL))
    r = run_cli("--model_cls", "wan2.1_distill", "--task", "t2v", "--model_path", str(t2v_root), "--config_json",
                str(cfg), "--prompt", "a red square moving left", "--seed", "3", "--save_result_path",
                str(tmp_path / "t.mp4"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["nfe"] == 4 and summary["frames"] == 5
    frames, _ = read_mp4(tmp_path / "t.mp4")
    assert frames.shape == (5, 32, 48, 3)
    from PIL import Image
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "first.png")
    r = run_cli("--model_cls", "wan2.1_distill", "--task", "i2v", "--model_path", str(i2v_root), "--config_json",
                str(cfg), "--prompt", "a red square", "--image_path", str(tmp_path / "first.png"),
                "--save_result_path", str(tmp_path / "i.mp4"))
    assert r.returncode == 0, r.stderr
    assert read_mp4(tmp_path / "i.mp4")[0].shape == (5, 32, 48, 3)


@pytest.mark.parametrize("extra,msg", [
    ({"target_video_length": 6}, "4n+1"),
    ({"enable_cfg": True}, "enable_cfg = true: must be false"),
])
def test_cli_bad_config_is_one_line(t2v_root, tmp_path, extra, msg):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({**DISTILL, **extra}))
    r = run_cli("--model_cls", "wan2.1_distill", "--task", "t2v", "--model_path", str(t2v_root), "--config_json",
                str(cfg), "--prompt", "x", "--save_result_path", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_cli_unknown_model_cls_and_missing_image(t2v_root, i2v_root, tmp_path):
    r = run_cli("--model_cls", "wan9", "--task", "t2v", "--model_path", str(t2v_root), "--prompt", "x",
                "--save_result_path", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and "invalid choice: 'wan9'" in r.stderr
    cfg = tmp_path / "d.json"
    cfg.write_text(json.dumps(DISTILL))
    r = run_cli("--model_cls", "wan2.1_distill", "--task", "i2v", "--model_path", str(i2v_root), "--config_json",
                str(cfg), "--prompt", "x", "--save_result_path", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and "needs --image_path" in r.stderr and "Traceback" not in r.stderr


def test_decode_mp4_streams_the_same_video_into_the_encoder(t2v_root, monkeypatch):
    """decode_mp4 feeds the encoder one latent frame's pixels at a time (never the whole video) and writes the
    same file as decoding the whole video then encoding it (the stream decoder's frames are the decode's)."""
    from model import video as video_module
    pipe = pipe_for(t2v_root, "wan2.1_distill", {**DISTILL, "target_video_length": 13})
    latents = torch.randn(1, pipe.vae.z_dim, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    whole = pipe.decode(latents)
    chunks = []
    real = video_module.Mp4Writer.write
    monkeypatch.setattr(video_module.Mp4Writer, "write", lambda self, v: chunks.append(v.shape[1]) or real(self, v))
    data, size = pipe.decode_mp4(latents)
    assert size == (13, 32, 48) and chunks == [1, 4, 4, 4]
    assert data == video_module.encode_mp4([whole], pipe.cfg.fps)[0]
