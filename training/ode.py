"""Stages 4-5: ODE-pair initialisation of the 4-step student (CausVid / Self-Forcing `ode_regression`).

ode-pairs: the teacher integrates the probability-flow ODE with CFG from noise, and the latents at the
student's four sigmas plus the clean endpoint are stored (one shard per batch, so the stage resumes).
ode-init: the student regresses the endpoint from a point at one of its sigmas, on the teacher's trajectory
or on the straight line the deterministic sampler feeds it. Details: ARCHITECTURE.md.

    python -m training ode-pairs --pairs 512
    python -m training ode-init --steps 600
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.schedulers import EulerFlowScheduler

from . import data
from .common import (
    EMA,
    OUT,
    Log,
    TextCache,
    autocast,
    dit_from_state,
    fit,
    null_prompts,
    save_atomic,
    save_final,
    setup,
    stage_device,
    write_json,
    x0_from_flow,
)
from .sample import LATENT_SHAPE, SHIFT, cfg_flow, evaluate_student, on_device

ODE_STEPS = 48


def keep_indices(steps: int) -> tuple[int, ...]:
    """The grid indices where an Euler grid of `steps` (a multiple of 4) on shift 5 meets the student's sigmas:
    u = 0, 1/4, 1/2, 3/4 -> sigma 1, .9375, .8333, .625 ((0, 12, 24, 36) for 48 steps)."""
    if steps % 4:
        raise ValueError(f"the ODE grid needs a multiple of 4 steps to hit the student's sigmas, not {steps}")
    return tuple(i * steps // 4 for i in range(4))


KEEP = keep_indices(ODE_STEPS)


@torch.no_grad()
def teacher_trajectory(teacher, ctx, ctx_null, noise, guide: float, steps: int = ODE_STEPS, shift: float = SHIFT,
                       keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [B, len(keep), ...] at the kept indices, clean endpoint [B, ...])."""
    keep = keep_indices(steps) if keep is None else keep
    sched = EulerFlowScheduler(steps, shift)
    (x, ctx, ctx_null), points = on_device(teacher, noise.clone(), ctx, ctx_null), []
    for i in range(steps):
        if i in keep:
            points.append(x.clone())
        t = sched.timesteps[i].float().expand(x.shape[0]).to(x.device)
        x = sched.step(i, cfg_flow(teacher, x, t, ctx, ctx_null, guide), x)
    return torch.stack(points, 1).cpu(), x.cpu()


def train_ode_pairs(args) -> Path:
    from .teacher import load_teacher
    dev = setup(args.threads, args.seed, stage_device(args))
    root = Path(args.out)
    out = root / "ode_pairs"
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(root).to(dev)
    text = TextCache(root)
    prompts = data.all_prompts()
    n_shards = (args.pairs + args.batch - 1) // args.batch
    done = sum((out / f"shard_{k:04d}.pt").is_file() for k in range(n_shards))
    log = Log(out / "log.jsonl", n_shards, done, desc="ode-pairs", quiet=args.quiet)
    sched = EulerFlowScheduler(args.steps, SHIFT)
    keep = list(keep_indices(args.steps))
    t0 = time.time()
    wi, wn = (int(v) for v in args.worker.split("/"))
    for k in range(n_shards):
        path = out / f"shard_{k:04d}.pt"
        if path.is_file() or k % wn != wi:
            continue
        g = torch.Generator().manual_seed(args.seed * 1000 + k)
        b = min(args.batch, args.pairs - k * args.batch)
        ps = [prompts[i] for i in torch.randint(0, len(prompts), (b,), generator=g).tolist()]
        noise = torch.randn((b, *LATENT_SHAPE), generator=g)
        pts, x0 = teacher_trajectory(teacher, text(ps), text([null_prompts()[1]] * b), noise, args.guide,
                                     steps=args.steps)
        save_atomic({"points": pts.half(), "x0": x0.half(), "noise": noise.half(), "prompts": ps,
                     "sigmas": sched.sigmas[keep].float()}, path)
        log.step(k + 1, pairs=k * args.batch + b)
        log.advance()
    log.close()
    write_json(out / "summary.json", {"pairs": args.pairs, "guide": args.guide, "steps": args.steps,
                                      "seconds_this_run": round(time.time() - t0, 1)})
    return out


def load_pairs(root: Path) -> dict:
    shards = sorted((Path(root) / "ode_pairs").glob("shard_*.pt"))
    if not shards:
        raise FileNotFoundError(f"no ODE pairs in {Path(root) / 'ode_pairs'}: run `python -m training ode-pairs`")
    cks = [torch.load(p, weights_only=True) for p in shards]
    return {"points": torch.cat([c["points"] for c in cks]).float(), "x0": torch.cat([c["x0"] for c in cks]).float(),
            "noise": torch.cat([c["noise"] for c in cks]).float(), "prompts": [p for c in cks for p in c["prompts"]],
            "sigmas": cks[0]["sigmas"]}


def ode_loss(student, pairs: dict, idx: torch.Tensor, ctx: torch.Tensor, gen: torch.Generator,
             inputs: str = "mix") -> torch.Tensor:
    """mse(x0 predicted at a random student sigma, the teacher's endpoint)."""
    b = idx.shape[0]
    k = torch.randint(0, pairs["points"].shape[1], (b,), generator=gen)
    sigma = pairs["sigmas"][k]
    x0 = pairs["x0"][idx]
    traj = pairs["points"][idx, k]
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    straight = (1 - s) * x0 + s * pairs["noise"][idx]
    if inputs == "trajectory":
        x = traj
    elif inputs == "straight":
        x = straight
    else:
        use = (torch.rand(b, generator=gen) < 0.5).view(-1, *([1] * (x0.dim() - 1)))
        x = torch.where(use, straight, traj)
    x, x0, sigma, ctx = on_device(student, x, x0, sigma, ctx)
    v = student(x, sigma * 1000, ctx).float()
    return F.mse_loss(x0_from_flow(x, v, sigma), x0)


def train_on_pairs(stage: str, args, student, batch_loss, evaluate, eval_at_start: bool = False, **summary) -> Path:
    """Regression of a student on the ODE pairs (ode-init and causal-ode): AdamW, EMA, bf16 autocast.

    batch_loss(pairs, idx, ctx, gen) -> loss; evaluate(model, vae, text) -> adherence dict, run on the EMA
    (at step 0: on the initial student). Writes out/<stage>/student_final.pt (the EMA) and summary.json.
    """
    from .vae import load_trained_vae
    root = Path(args.out)
    out = root / STUDENT_DIRS[stage]
    pairs = load_pairs(root)
    text = TextCache(root)
    dev = torch.device(stage_device(args))
    student.to(dev)
    ema = EMA(student, args.ema)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)
    vae = load_trained_vae(root / "vae" / "vae_final.pt")
    n = pairs["x0"].shape[0]

    def loss_fn(step: int):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        with autocast(dev, enabled=not args.no_autocast):  # as the teacher trained
            return batch_loss(pairs, idx, text([pairs["prompts"][i] for i in idx.tolist()]), gen), {}

    t0 = time.time()
    step = fit(stage, out, args, student, opt, gen, loss_fn, ema=ema, eval_every=args.eval_every,
               eval_fn=lambda step: evaluate(dit_from_state(ema.shadow).to(dev) if step else student, vae, text),
               eval_at_start=eval_at_start and bool(args.eval_every))
    return save_final(out / "student_final.pt", ema.shadow, {"steps": step, **summary, "train_seconds_this_run":
                      round(time.time() - t0, 1)}, step=step)


def train_ode_init(args) -> Path:
    from .teacher import load_teacher
    setup(args.threads, args.seed, stage_device(args))
    student = copy.deepcopy(load_teacher(args.out)).requires_grad_(True)
    return train_on_pairs("ode-init", args, student,
                          lambda pairs, idx, ctx, gen: ode_loss(student, pairs, idx, ctx, gen, args.inputs),
                          evaluate_student)


STUDENT_DIRS = {"ode-init": "ode_init", "dmd": "dmd", "causal-ode": "causal_ode", "causal": "causal"}


def student_path(root: Path | None, stage: str) -> Path:
    return Path(root or OUT) / STUDENT_DIRS[stage] / "student_final.pt"


def load_student(root: Path | None, stage: str = "ode-init", which: str = "state"):
    """A stage's student (`which`: "state", or "ema" for the EMA the DMD stages save next to it)."""
    ck = torch.load(student_path(root, stage), weights_only=True)
    return dit_from_state(ck[which] if which in ck else ck["state"])


def latest_student(root: Path | None, stages: tuple[str, ...], which: str = "state"):
    """(stage, model) of the first of `stages` whose student exists (e.g. DMD, falling back to ODE-init)."""
    for stage in stages:
        if student_path(root, stage).is_file():
            return stage, load_student(root, stage, which)
    raise FileNotFoundError(f"none of the students {stages} exists under {root or OUT}")


def add_args_ode_pairs(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--guide", type=float, default=5.0, help="CFG scale w (code form s = w - 1)")
    ap.add_argument("--steps", type=int, default=ODE_STEPS, help="Euler steps of the teacher ODE (a multiple of 4)")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--worker", default="0/1", help="i/n: this process writes the shards k with k %% n == i")


def add_args_ode_init(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--inputs", choices=("mix", "trajectory", "straight"), default="mix")
    ap.add_argument("--no-autocast", action="store_true", help="fp32 forward (default: bf16 autocast)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=5)
