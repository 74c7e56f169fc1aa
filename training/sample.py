"""Batched samplers for training-time evaluation and ODE pairs, built on model/schedulers.py.

They run the same update rules as the pipelines (Wan's UniPC with CFG for the teacher, LightX2V's
deterministic 4-step jump for the student), batched over prompts, so training can measure adherence
without going through mp4 files. The shipped numbers come from benchmarks/quality.py, which uses the real
pipelines on demo_model/.
"""
from __future__ import annotations

import torch

from model.schedulers import (
    EulerFlowScheduler,
    FlowUniPCScheduler,
    StepDistillScheduler,
)

from . import data
from .common import device_of
from .quality import score, summarize

LATENT_SHAPE = (8, 5, 8, 8)  # z, F, h, w for 17 x 64 x 64
STUDENT_STEPS = (1000, 750, 500, 250)
SHIFT = 5.0


def noise_for(seeds, shape=LATENT_SHAPE) -> torch.Tensor:
    """The pipeline's initial noise for each seed (torch.Generator('cpu').manual_seed(seed), float32)."""
    return torch.stack([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)))[0]
                        for s in seeds])


def cfg_flow(dit, x, t, ctx, ctx_null, guide: float) -> torch.Tensor:
    """Wan's CFG: uncond + guide * (cond - uncond), cond and uncond in one batch."""
    if ctx_null is None or guide == 1.0:
        return dit(x, t, ctx).float()
    out = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, ctx_null])).float()
    cond, uncond = out.chunk(2)
    return uncond + guide * (cond - uncond)


def on_device(dit, *tensors):
    """The inputs moved to the DiT's device (samplers take CPU noise and contexts, return CPU latents)."""
    dev = device_of(dit)
    return tuple(None if t is None else t.to(dev) for t in tensors)


@torch.no_grad()
def sample_teacher(dit, ctx, ctx_null, noise, steps: int = 50, shift: float = SHIFT, guide: float = 5.0,
                   solver: str = "unipc") -> torch.Tensor:
    sched = FlowUniPCScheduler(steps, shift) if solver == "unipc" else EulerFlowScheduler(steps, shift)
    x, ctx, ctx_null = on_device(dit, noise.clone(), ctx, ctx_null)
    for i in range(len(sched)):
        t = sched.timesteps[i].float().expand(x.shape[0]).to(x.device)
        x = sched.step(i, cfg_flow(dit, x, t, ctx, ctx_null, guide), x)
    return x.cpu()


@torch.no_grad()
def sample_student(dit, ctx, noise, steps=STUDENT_STEPS, shift: float = SHIFT) -> torch.Tensor:
    """LightX2V deterministic 4-step sampling (x0 = x - s v; x_next = x0 + s_next v), no CFG."""
    sched = StepDistillScheduler(list(steps), shift, "deterministic")
    x, ctx = on_device(dit, noise.clone(), ctx)
    for i in range(len(sched)):
        t = sched.timesteps[i].float().expand(x.shape[0]).to(x.device)
        x = sched.step(i, dit(x, t, ctx).float(), x)
    return x.cpu()


@torch.no_grad()
def adherence(vae, latents: torch.Tensor, prompts: list[str]) -> dict:
    """Decode each latent and score it against its prompt (summary dict)."""
    results = [score(vae.decode(latents[i:i + 1])[0], p) for i, p in enumerate(prompts)]
    return summarize(results)


def eval_set(n: int = 12) -> tuple[list[str], list[int]]:
    prompts = data.eval_prompts(n, seed=4321)  # not the benchmark's prompt set
    return prompts, list(range(5000, 5000 + n))


def evaluate_student(dit, vae, text, n: int = 12) -> dict:
    """Adherence of the 4-step student on the training-time eval set (text: a TextCache)."""
    prompts, seeds = eval_set(n)
    dit.eval()
    return adherence(vae, sample_student(dit, text(prompts), noise_for(seeds)), prompts)
