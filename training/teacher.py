"""Stage 3: the DiT teacher, trained with flow matching and CFG dropout on the encoded clips.

x_s = (1 - s) x0 + s eps, the DiT is fed t = 1000 s and regresses v = eps - x0 (MSE). s = shift(u, 3) with
u ~ U(0, 1): most of the weight at the high noise levels where 50-step shift-5 sampling and the DMD critic
spend their time, while every level is still trained. 10 % of the prompts are dropped for CFG: half to the
empty prompt, half to Wan's default negative prompt, since that is what the pipeline's CFG branch encodes.
AdamW (lr 3e-4 after a 200-step warm-up, constant), grad clip 1, EMA 0.999 (the EMA is the teacher),
bf16 autocast on CPU for the forward (fp32 master weights).

    python -m training teacher --steps 2000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    EMA,
    autocast as autocast_on,
    OUT,
    TextCache,
    add_noise,
    device_of,
    dit_from_state,
    fit,
    load_state,
    lr_at,
    new_dit,
    null_prompts,
    save_final,
    setup,
    shift_sigma,
    stage_device,
)
from .latents import load_latents
from .sample import adherence, eval_set, noise_for, sample_teacher
from .vae import load_trained_vae

STAGE = "teacher"


def fm_loss(dit, x0, ctx, gen: torch.Generator, shift: float, autocast: bool = True):
    """Noise drawn on the CPU from `gen` (the same batches on any device), the rest on the DiT's device."""
    b = x0.shape[0]
    u = torch.rand(b, generator=gen, dtype=torch.float64)
    sigma = shift_sigma(u, shift).float().clamp(1e-3, 1.0)
    eps = torch.randn(x0.shape, generator=gen)
    dev = device_of(dit)
    x0, eps, sigma, ctx = x0.to(dev), eps.to(dev), sigma.to(dev), ctx.to(dev)
    xt = add_noise(x0, eps, sigma)
    with autocast_on(dev, autocast):
        v = dit(xt, sigma * 1000, ctx)
    return F.mse_loss(v.float(), eps - x0)


def drop_prompts(prompts: list[str], gen: torch.Generator, p: float) -> list[str]:
    nulls = null_prompts()
    r = torch.rand(len(prompts), generator=gen)
    k = torch.randint(0, len(nulls), (len(prompts),), generator=gen)
    return [nulls[int(k[i])] if r[i] < p else q for i, q in enumerate(prompts)]


def evaluate(dit, vae, text: TextCache, n: int = 12, steps: int = 25, guide: float = 5.0) -> dict:
    prompts, seeds = eval_set(n)
    ctx = text(prompts)
    ctx_null = text([null_prompts()[1]] * n)
    dit.eval()
    lat = sample_teacher(dit, ctx, ctx_null, noise_for(seeds), steps=steps, guide=guide)
    return adherence(vae, lat, prompts)


def train(args) -> Path:
    dev = setup(args.threads, args.seed, stage_device(args))
    root = Path(args.out)
    out = root / STAGE
    latents, prompts = load_latents(root)
    text = TextCache(root)
    text(sorted(set(prompts)) + list(null_prompts()))
    dit = new_dit(args.seed).to(dev)
    ema = EMA(dit, args.ema)  # a resumed run takes this decay (e.g. a shorter average when --steps was cut)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)
    vae = load_trained_vae(root / "vae" / "vae_final.pt")

    def lr_fn(step: int) -> float:
        if not args.decay_from or step < args.decay_from:
            return lr_at(step, args.lr, args.warmup, args.steps, final_frac=1.0)
        return args.lr * max(0.05, 1 - (step - args.decay_from) / max(1, args.steps - args.decay_from))

    def loss_fn(step: int):
        idx = torch.randint(0, latents.shape[0], (args.batch,), generator=gen)
        ctx = text(drop_prompts([prompts[i] for i in idx.tolist()], gen, args.cfg_drop))
        return fm_loss(dit, latents[idx], ctx, gen, args.shift, not args.no_autocast), {}

    t0 = time.time()
    step = fit(STAGE, out, args, dit, opt, gen, loss_fn, ema=ema, lr_fn=lr_fn, eval_every=args.eval_every,
               eval_fn=lambda _: evaluate(dit_from_state(ema.shadow).to(dev), vae, text))
    return save_final(out / "teacher_final.pt", ema.shadow, {"steps": step, "train_seconds_this_run":
                      round(time.time() - t0, 1)}, step=step)


def load_teacher(root: Path | None = None):
    return dit_from_state(load_state(Path(root or OUT) / STAGE / "teacher_final.pt")).eval().requires_grad_(False)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-from", type=int, default=0, help="linear lr decay from this step to --steps (0: none)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--seed", type=int, default=3)
