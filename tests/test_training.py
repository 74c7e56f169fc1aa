"""The training code of training/ on tiny models (seconds): losses go down, runs resume exactly, and the
training-time samplers/rollouts are the pipelines' own sampling (so what is trained is what is served)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import randomize, torch_threads

from model.archs import DiTArch
from model.causal import CausalDiT
from model.causal_pipeline import CausVidPipeline
from model.config import load_run_config
from model.dit import WanModel
from model.pipeline import WanPipeline
from model.schedulers import EulerFlowScheduler, StepDistillScheduler
from model.tiny import write_tiny_model
from training.common import EMA, ROOT, fit, read_jsonl
from training.dmd import DMD, DMDConfig
from training.ode import keep_indices, ode_loss, teacher_trajectory
from training.sample import noise_for, sample_student, sample_teacher
from training.selfforcing import block_noise, causal_ode_loss, causal_rollout
from training.teacher import fm_loss

# patch (1, 1, 1) as the demo model; text_dim / out_dim match model.tiny's TINY_T5 / TINY_VAE for the pipeline tests
ARCH = DiTArch(model_type="t2v", patch_size=(1, 1, 1), in_dim=4, out_dim=4, dim=32, ffn_dim=64, freq_dim=32,
               text_dim=32, text_len=16, num_heads=2, num_layers=2)
SHAPE = (4, 3, 4, 4)  # z, latent frames, h, w
STEPS = (1000, 750, 500, 250)


@pytest.fixture(autouse=True)
def _threads():  # the models here are tiny: one thread is fastest (and does not fight a loaded machine)
    with torch_threads(1):
        yield


def new_dit(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    return WanModel(ARCH).init_weights()


def toy_data(n: int = 4, seed: int = 0):
    """n classes: class c is a fixed latent (one value per channel, + small noise) with its own text context."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn((n, SHAPE[0], 1, 1, 1), generator=g).expand(n, *SHAPE).contiguous()
    contexts = torch.randn((n, ARCH.text_len, ARCH.text_dim), generator=g)
    return patterns, contexts


def test_flow_matching_run_lowers_the_loss():
    patterns, contexts = toy_data()
    dit = new_dit()
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            cls = torch.arange(16) % 4
            return fm_loss(dit, patterns[cls], contexts[cls], g, shift=3.0, autocast=False).item()

    before = eval_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        cls = torch.randint(0, 4, (8,), generator=g)
        x0 = patterns[cls] + 0.05 * torch.randn((8, *SHAPE), generator=g)
        loss = fm_loss(dit, x0, contexts[cls], g, shift=3.0, autocast=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def _fit_run(out, steps: int, evals: list, max_minutes: float = 0):
    """A flow-matching stage run through training.common.fit (what vae/teacher/ode-init/causal-ode use)."""
    patterns, contexts = toy_data()
    dit = new_dit(2)
    ema = EMA(dit, 0.9)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def loss_fn(step):
        cls = torch.randint(0, 4, (8,), generator=gen)
        return fm_loss(dit, patterns[cls], contexts[cls], gen, shift=3.0, autocast=False), {"step_seen": step}

    args = SimpleNamespace(steps=steps, log_every=2, ckpt_every=3, quiet=True, max_minutes=max_minutes)
    fit("toy", out, args, dit, opt, gen, loss_fn, ema=ema, lr_fn=lambda step: 3e-3 * (1 - step / 20),
        eval_fn=lambda step: evals.append(step) or {"n": step}, eval_every=4)
    return dit, ema


def test_fit_resumes_exactly(tmp_path):
    evals_a, evals_b = [], []
    a, ema_a = _fit_run(tmp_path / "a", 10, evals_a)
    _fit_run(tmp_path / "b", 5, evals_b)  # interrupted at step 5 (its last checkpoint is the one at step 5) ...
    b, ema_b = _fit_run(tmp_path / "b", 10, evals_b)  # ... and resumed with the full length
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
        assert torch.allclose(ema_a.shadow[k], ema_b.shadow[k], atol=1e-6), k
    assert ema_a.n == ema_b.n == 10
    assert evals_a == [4, 8, 10] and evals_b == [4, 5, 8, 10]
    log = read_jsonl(tmp_path / "a" / "log.jsonl")
    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert train[-1]["step_seen"] == 8.5  # the mean over the logged window (steps 8 and 9, 0-based)
    assert abs(train[0]["lr"] - 3e-3 * (1 - 1 / 20)) < 1e-9
    assert [r["eval_n"] for r in log if "eval_n" in r] == [4, 8, 10]


def test_fit_time_box_ends_with_checkpoint_and_eval_then_resumes(tmp_path):
    evals_a, evals_b = [], []
    a, ema_a = _fit_run(tmp_path / "a", 10, evals_a)
    _fit_run(tmp_path / "b", 10, evals_b, max_minutes=1e-9)  # out of time after its first step
    assert evals_b == [1]  # the time-boxed run evaluated where it stopped ...
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 1  # ... and checkpointed there
    b, ema_b = _fit_run(tmp_path / "b", 10, evals_b)  # rerun without a limit: continues to the end
    assert evals_b == [1, 4, 8, 10]
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
        assert torch.allclose(ema_a.shadow[k], ema_b.shadow[k], atol=1e-6), k


def test_text_contexts_file_replaces_the_encoder(tmp_path):
    from training.common import TEXT_CONTEXTS, TextCache, null_prompts, train_text
    from training.data import all_prompts
    train_text(SimpleNamespace(out=str(tmp_path)))
    cached = TextCache(tmp_path)
    prompts = [all_prompts()[7], null_prompts()[1], all_prompts()[300]]
    ctx = cached(prompts)
    assert cached._encoder is None  # every grammar prompt came from the file: no text encoder was built
    fresh = TextCache()(prompts)
    assert torch.equal(ctx, fresh)
    ck = torch.load(tmp_path / TEXT_CONTEXTS, weights_only=True)
    assert len(ck["contexts"]) == len(set(all_prompts()) | set(null_prompts()))
    ck["fingerprint"] = "another encoder"
    torch.save(ck, tmp_path / TEXT_CONTEXTS)
    assert TextCache(tmp_path)._cache == {}  # made by another encoder: ignored, encoded afresh on demand


def test_stage_device_defaults_to_cpu_and_cpu_only_stages_refuse_cuda():
    from training.common import stage_device
    assert stage_device(SimpleNamespace()) == "cpu"
    assert stage_device(SimpleNamespace(device="cuda:1")) == "cuda:1"
    with pytest.raises(SystemExit, match="dmd stage runs on the CPU only"):
        stage_device(SimpleNamespace(device="cuda"), cpu_only="dmd")


def test_parallel_rendering_gives_the_clips_of_data_batch():
    from training import data
    from training.latents import render_batch, to_video
    seeds = [20_000_000 + i for i in (0, 5, 77)]
    frames, prompts = render_batch(seeds)
    ref, ref_prompts = data.batch(seeds)
    assert frames.dtype.name == "uint8" and prompts == ref_prompts
    assert torch.equal(to_video(frames), ref)


def test_ode_grid_hits_the_student_sigmas():
    sigmas = StepDistillScheduler(list(STEPS), 5.0).sigmas[:4]
    for steps in (48, 24, 16):
        grid = EulerFlowScheduler(steps, 5.0).sigmas
        assert torch.allclose(grid[list(keep_indices(steps))], sigmas, atol=1e-6), steps
    with pytest.raises(ValueError):
        keep_indices(30)


def _tiny_dmd(seed: int = 0) -> DMD:
    teacher = randomize(new_dit(seed), seed, scale=0.05)
    generator = copy.deepcopy(teacher).requires_grad_(True)
    critic = copy.deepcopy(teacher).requires_grad_(True)
    return DMD(teacher, critic, generator, DMDConfig(lr_gen=1e-3, lr_critic=3e-3), seed=seed)


def _ctx_fn(seed: int = 5):
    _, contexts = toy_data()
    g = torch.Generator().manual_seed(seed)

    def fn(b):
        cls = torch.randint(0, 4, (b,), generator=g)
        return contexts[cls], torch.zeros(b, ARCH.text_len, ARCH.text_dim)
    fn.generator = g
    return fn


def test_dmd_critic_loss_goes_down_and_updates_follow_the_1_to_5_schedule():
    dmd = _tiny_dmd()
    _, contexts = toy_data()
    ctx = contexts[torch.arange(8) % 4]
    with torch.no_grad():  # fixed generator samples and noise for a comparable critic loss
        x = sample_student(dmd.gen, ctx, noise_for(range(8), SHAPE))

    def critic_eval():
        dmd.rng.manual_seed(77)
        with torch.no_grad():
            return dmd.critic_loss(ctx, SHAPE, x=x).item()

    teacher0 = copy.deepcopy(dmd.teacher.state_dict())
    before = critic_eval()
    fn = _ctx_fn()
    gen_losses = []
    for _ in range(25):
        rec = dmd.step(fn, 8, SHAPE)
        if "loss_gen" in rec:
            gen_losses.append(rec["loss_gen"])
    assert dmd.iteration == 25 and dmd.gen_updates == 5  # iterations 0, 5, 10, 15, 20
    assert all(torch.isfinite(torch.tensor(gen_losses))) and all(v > 0 for v in gen_losses)
    assert critic_eval() < 0.9 * before
    assert all(torch.equal(v, dmd.teacher.state_dict()[k]) for k, v in teacher0.items())  # frozen


def test_dmd_resumes_exactly():
    a = _tiny_dmd()
    fa = _ctx_fn()
    for _ in range(6):
        a.step(fa, 4, SHAPE)
    b = _tiny_dmd()
    fb = _ctx_fn()
    for _ in range(3):
        b.step(fb, 4, SHAPE)
    state = copy.deepcopy(b.state_dict())
    rng = fb.generator.get_state()
    c = _tiny_dmd()  # the same frozen teacher (it is loaded from its own file, not from the DMD checkpoint) ...
    randomize(c.gen, 5)  # ... but other trainable weights and RNG: they must all come from the checkpoint
    randomize(c.critic, 6)
    c.rng.manual_seed(1234)
    c.load_state_dict(state)
    fc = _ctx_fn(seed=99)
    fc.generator.set_state(rng)
    for _ in range(3):
        c.step(fc, 4, SHAPE)
    for k, v in a.gen.state_dict().items():
        assert torch.allclose(v, c.gen.state_dict()[k], atol=1e-6), k
    assert (a.iteration, a.gen_updates) == (c.iteration, c.gen_updates)


def test_ode_regression_lowers_the_loss():
    _, contexts = toy_data()
    teacher = randomize(new_dit(3), 3, scale=0.05)
    cls = torch.arange(8) % 4
    noise = noise_for(range(8), SHAPE)
    sched = StepDistillScheduler(list(STEPS), 5.0)
    pts, x0 = teacher_trajectory(teacher, contexts[cls], contexts[cls] * 0, noise, guide=3.0)
    assert torch.allclose(pts[:, 0], noise)  # index 0 is sigma 1: the noise itself
    pairs = {"points": pts, "x0": x0, "noise": noise, "sigmas": sched.sigmas[:4].float()}
    student = copy.deepcopy(teacher).requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    idx = torch.arange(8)

    def eval_loss():
        with torch.no_grad():
            return ode_loss(student, pairs, idx, contexts[cls], torch.Generator().manual_seed(9)).item()

    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = ode_loss(student, pairs, idx, contexts[cls], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_causal_ode_loss_trains_under_the_block_causal_mask():
    patterns, contexts = toy_data()
    cls = torch.arange(8) % 4
    noise = noise_for(range(8), SHAPE)
    sigmas = StepDistillScheduler(list(STEPS), 5.0).sigmas[:4].float()
    x0 = patterns[cls]
    pts = torch.stack([(1 - s) * x0 + s * noise for s in sigmas], 1)
    pairs = {"points": pts, "x0": x0, "noise": noise, "sigmas": sigmas}
    dit = new_dit(4)
    causal = CausalDiT(dit, 1)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            return causal_ode_loss(causal, pairs, torch.arange(8), contexts[cls], torch.Generator().manual_seed(3)).item()

    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = causal_ode_loss(causal, pairs, torch.arange(8), contexts[cls], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_causal_rollout_has_no_gradient_through_the_cache():
    dit = randomize(new_dit(), 0, scale=0.1).requires_grad_(True)
    causal = CausalDiT(dit, 1)
    sched = StepDistillScheduler(list(STEPS), 5.0)
    _, contexts = toy_data()
    noise = block_noise([1, 2], SHAPE).requires_grad_(True)
    out = causal_rollout(causal, contexts[:2], noise, exit_step=0, sched=sched, grad=True)
    out[:, :, 1].sum().backward()
    assert noise.grad[:, :, 1].abs().sum() > 0  # the exit step's input is the block's own noise
    assert noise.grad[:, :, 0].abs().sum() == 0 and noise.grad[:, :, 2].abs().sum() == 0
    assert dit.blocks[0].self_attn.q.weight.grad is not None
    # deeper exit steps: the steps before it carry no gradient either
    noise.grad = None
    out = causal_rollout(causal, contexts[:2], noise, exit_step=2, sched=sched, grad=True)
    out.sum().backward()
    assert noise.grad is None or noise.grad.abs().sum() == 0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    dit = randomize(new_dit(), 11, scale=0.1)
    words = ["a", "red", "square", "moving", "left", "on", "blue", "background"]
    return write_tiny_model(tmp_path_factory.mktemp("m") / "model", "t2v", dit=dit, distill=dit, causal=dit,
                            words=words)


SIZE = {"target_video_length": 9, "target_height": 32, "target_width": 32, "text_len": 16, "sample_shift": 5}


def test_training_samplers_equal_the_pipelines(tiny_folder):
    prompt = "a red square moving left on a blue background"
    distill = WanPipeline.from_pretrained(tiny_folder, load_run_config(
        {**SIZE, "enable_cfg": False, "denoising_step_list": list(STEPS)}, model_cls="wan2.1_distill"))
    ctx, _ = distill.text_encoder.encode([prompt])
    shape = (4, 3, 4, 4)
    got = distill.generate(prompt, seed=3).latents
    want = sample_student(distill.dit, ctx, noise_for([3], shape))[0]
    assert torch.allclose(got, want, atol=1e-5)

    base = WanPipeline.from_pretrained(tiny_folder, load_run_config(
        {**SIZE, "infer_steps": 6, "sample_guide_scale": 4, "sample_neg_prompt": "blue"}, model_cls="wan2.1"))
    ctx2, _ = base.text_encoder.encode([prompt, "blue"])
    got = base.generate(prompt, seed=4).latents
    want = sample_teacher(base.dit, ctx2[:1], ctx2[1:], noise_for([4], shape), steps=6, guide=4.0)[0]
    assert torch.allclose(got, want, atol=1e-5)

    cfg = load_run_config({**SIZE, "enable_cfg": False, "denoising_step_list": list(STEPS), "warp_denoising_step": True,
                           "renoise": "deterministic", "num_frames": 3, "num_frame_per_block": 1, "num_blocks": 3,
                           "num_fragments": 1}, model_cls="wan2.1_causvid")
    causvid = CausVidPipeline.from_pretrained(tiny_folder, cfg)
    got = causvid.generate(prompt, seed=5).latents
    sched = StepDistillScheduler(list(STEPS), 5.0, "deterministic")
    want = causal_rollout(CausalDiT(causvid.dit, 1), ctx, block_noise([5], shape), len(sched) - 1, sched, grad=False)[0]
    assert torch.allclose(got, want, atol=1e-5)


DEMO = ROOT / "demo_model"


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="demo_model/ not exported")
def test_shipped_demo_model_layout_size_and_a_4_step_clip():
    files = {p.relative_to(DEMO).as_posix(): p.stat().st_size for p in DEMO.rglob("*") if p.is_file()}
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "distill_models/distill_model.safetensors",
                 "causvid_models/causal_model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "google/umt5-xxl/tokenizer.json"):
        assert name in files, name
    assert sum(files.values()) <= 30 * 2**20
    from training.demo import generate, load_pipeline
    from training.quality import score
    pipe = load_pipeline("distill", DEMO)
    prompt = "a red square moving right on a blue background"
    video = generate(pipe, "distill", prompt, 0).video
    assert tuple(video.shape) == (3, 17, 64, 64)
    got = score(video, prompt)  # training/quality.py reads the clip back: every part of the prompt is there
    assert {k: got["detected"][k] for k in ("shape", "colour", "direction", "background")} == {
        "shape": "square", "colour": "red", "direction": "right", "background": "blue"}, got
    assert got["all4"] and got["detected"]["frames_with_shape"] == 17
