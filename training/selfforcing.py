"""Stages 7-8: the causal (CausVid) student, trained Self-Forcing style.

The causal student is the same WanModel run block-causally by model/causal.py (`CausalDiT`): blocks of one
latent frame, each denoised in the bidirectional student's 4 steps and then run clean at t = 0 to leave its
K/V in the cache. causal-ode: CausVid's ODE regression under the block-causal mask; causal: Self-Forcing DMD
whose generator rollout is the inference loop over the KV cache. Details: ARCHITECTURE.md.

    python -m training causal-ode --steps 400
    python -m training causal --gen-steps 200
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from model.kernels import SDPA, AttentionKernel
from model.causal import CausalDiT, LayerKV, cache_attention
from model.schedulers import StepDistillScheduler

from .common import EMA, TextCache, dit_from_state, setup, stage_device, x0_from_flow
from .dmd import DMD, DMDConfig, prompt_sampler, run_dmd
from .sample import LATENT_SHAPE, SHIFT, STUDENT_STEPS, adherence, eval_set, on_device

BLOCK = 1  # latent frames per block (num_frame_per_block)


def _attend_readonly(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV,
                     kernel: AttentionKernel = SDPA) -> torch.Tensor:
    """The block's queries over [cached frames before the block | the block's own k/v]; writes nothing."""
    start, frames = layer.cache.block
    if layer.k is None or start == 0:
        return kernel(q, k, v)
    n = start * (k.shape[1] // frames)  # no window: frame f lives in slot f
    return kernel(q, torch.cat([layer.k[:, :n], k], 1), torch.cat([layer.v[:, :n], v], 1))


def causal_rollout(causal: CausalDiT, ctx: torch.Tensor, noise: torch.Tensor, exit_step: int,
                   sched: StepDistillScheduler, grad: bool = True) -> torch.Tensor:
    """[B, z, F, h, w]: every block's x0 at `exit_step` (with gradient if grad), blocks generated in order
    over a fresh KV cache exactly as CausVidPipeline does (same sampler steps, clean t = 0 cache pass)."""
    if causal.window is not None:
        raise ValueError("training rollout assumes an unwindowed cache")
    b, _, frames = noise.shape[:3]
    noise, ctx = on_device(causal.dit, noise, ctx)
    cache = causal.new_cache()
    cache.reserve(frames)
    with torch.set_grad_enabled(grad):
        ctx_kv = causal.context_kv(ctx)
    outs = []
    try:
        for f0 in range(0, frames, causal.block_frames):
            x = noise[:, :, f0:f0 + causal.block_frames]
            causal.attend = _attend_readonly
            for i in range(exit_step + 1):
                t = sched.timesteps[i].float().expand(b)
                if i < exit_step:
                    with torch.no_grad():
                        x = sched.step(i, causal.forward_block(x, t, f0, cache, ctx_kv).float(), x)
                else:
                    with torch.set_grad_enabled(grad):
                        flow = causal.forward_block(x, t, f0, cache, ctx_kv).float()
                        x0 = x0_from_flow(x, flow, sched.sigmas[i].float().expand(b))
            outs.append(x0)
            causal.attend = cache_attention
            with torch.no_grad():
                causal.forward_block(x0.detach(), torch.zeros(b, device=x0.device), f0, cache, ctx_kv, output=False)
    finally:
        causal.attend = cache_attention
    return torch.cat(outs, 2)


def block_noise(seeds, shape=LATENT_SHAPE, block: int = BLOCK) -> torch.Tensor:
    """The CausVid session's noise: per seed, one generator drawing [1, z, block, h, w] block after block."""
    z, frames, h, w = shape
    out = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        out.append(torch.cat([torch.randn((1, z, block, h, w), generator=g) for _ in range(frames // block)], 2)[0])
    return torch.stack(out)


def make_rollout(block: int = BLOCK):
    wrappers: dict[int, CausalDiT] = {}

    def fn(gen_dit, ctx, noise, exit_step, sched, grad=True):
        causal = wrappers.setdefault(id(gen_dit), CausalDiT(gen_dit, block))
        return causal_rollout(causal, ctx, noise, exit_step, sched, grad)
    return fn


@torch.no_grad()
def evaluate_causal(dit, vae, text: TextCache, n: int = 12) -> dict:
    prompts, seeds = eval_set(n)
    dit.eval()
    sched = StepDistillScheduler(list(STUDENT_STEPS), SHIFT, "deterministic")
    lat = causal_rollout(CausalDiT(dit, BLOCK), text(prompts), block_noise(seeds), len(sched) - 1, sched, grad=False)
    return adherence(vae, lat, prompts)


# --------------------------------------------------------------------------------------------------
# causal-ode
# --------------------------------------------------------------------------------------------------
def causal_ode_loss(causal: CausalDiT, pairs: dict, idx: torch.Tensor, ctx: torch.Tensor, gen: torch.Generator,
                    p_clean: float = 0.25) -> torch.Tensor:
    x0, noise, pts = pairs["x0"][idx], pairs["noise"][idx], pairs["points"][idx]  # pts [B, K, z, F, h, w]
    b, kk = pts.shape[:2]
    frames = x0.shape[2]
    nb = frames // causal.block_frames
    k = torch.randint(0, kk, (b, nb), generator=gen).repeat_interleave(causal.block_frames, 1)  # [B, F]
    clean = (torch.rand(b, nb, generator=gen) < p_clean).repeat_interleave(causal.block_frames, 1)
    sigma = torch.where(clean, torch.zeros(()), pairs["sigmas"][k])  # [B, F]
    s = sigma[:, None, :, None, None]
    straight = (1 - s) * x0 + s * noise
    traj = pts.gather(1, k[:, None, None, :, None, None].expand(b, 1, *x0.shape[1:])).squeeze(1)
    use_straight = (torch.rand(b, generator=gen) < 0.5).view(-1, 1, 1, 1, 1)
    x = torch.where(clean[:, None, :, None, None], x0, torch.where(use_straight, straight, traj))
    x, x0, s, sigma, ctx, clean = on_device(causal.dit, x, x0, s, sigma, ctx, clean)
    v = causal.forward_full(x, sigma * 1000, ctx).float()
    err = (x - s * v - x0).pow(2) * (~clean)[:, None, :, None, None]
    return err.sum() / ((~clean).sum() * x0.shape[1] * x0.shape[3] * x0.shape[4]).clamp_min(1)


def train_causal_ode(args) -> Path:
    from .ode import latest_student, train_on_pairs
    setup(args.threads, args.seed, stage_device(args))
    init, student = latest_student(args.out, ("dmd", "ode-init"))  # the DMD student, else the ODE-regression one
    print(f"causal-ode: starting from the {init} student", flush=True)
    causal = CausalDiT(student, BLOCK)
    return train_on_pairs("causal-ode", args, student,  # the step-0 eval: the bidirectional student run causally
                          lambda pairs, idx, ctx, gen: causal_ode_loss(causal, pairs, idx, ctx, gen),
                          evaluate_causal, eval_at_start=True, init=init)


# --------------------------------------------------------------------------------------------------
# causal (Self-Forcing DMD)
# --------------------------------------------------------------------------------------------------
def train_causal(args) -> Path:
    from .ode import latest_student
    from .teacher import load_teacher
    from .vae import load_trained_vae
    setup(args.threads, args.seed, stage_device(args, cpu_only="causal"))
    root = Path(args.out)
    teacher = load_teacher(root)
    generator = latest_student(root, ("causal-ode",))[1].requires_grad_(True)
    dmd_ck = root / "dmd" / "ckpt.pt"
    if dmd_ck.is_file():  # the bidirectional DMD critic already models a 4-step student's outputs
        critic = dit_from_state(torch.load(dmd_ck, weights_only=False)["dmd"]["critic"]).requires_grad_(True)
    else:
        critic = copy.deepcopy(teacher).requires_grad_(True)
    cfg = DMDConfig(guidance=args.guidance, lr_gen=args.lr_gen, lr_critic=args.lr_critic, ratio=args.ratio)
    dmd = DMD(teacher, critic, generator, cfg, seed=args.seed, rollout_fn=make_rollout(BLOCK))
    text = TextCache(root)
    vae = load_trained_vae(root / "vae" / "vae_final.pt")
    return run_dmd("causal", root / "causal", args, dmd, EMA(generator, args.ema), prompt_sampler(text, args.seed + 1),
                   lambda m: evaluate_causal(m, vae, text))


def add_args_causal_ode(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--no-autocast", action="store_true", help="fp32 forward (default: bf16 autocast)")
    ap.add_argument("--seed", type=int, default=7)


def add_args_causal(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gen-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--lr-gen", type=float, default=2e-5)
    ap.add_argument("--lr-critic", type=float, default=2e-5)
    ap.add_argument("--ratio", type=int, default=5)
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=8)
