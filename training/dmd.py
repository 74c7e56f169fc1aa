"""Stage 6: DMD step distillation of the 4-step bidirectional student (Self-Forcing / DMD2 recipe).

Three DiTs of one architecture: the frozen teacher with CFG (real score), a critic trained with flow
matching on generator samples (fake score), and the generator, started from the ODE-regression checkpoint,
whose rollout is the inference sampler with a random exit step. The losses and hyper-parameters:
ARCHITECTURE.md.

    python -m training dmd --gen-steps 300
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.schedulers import StepDistillScheduler

from . import data
from .common import (
    EMA,
    Log,
    TextCache,
    add_noise,
    dit_from_state,
    null_prompts,
    rng_state,
    sample_sigma,
    save_atomic,
    save_final,
    set_rng_state,
    setup,
    stage_device,
    x0_from_flow,
)
from .sample import LATENT_SHAPE, SHIFT, STUDENT_STEPS, evaluate_student

STAGE = "dmd"


@dataclass
class DMDConfig:
    guidance: float = 4.0  # code form s: real = cond + s (cond - uncond), i.e. CFG scale 1 + s
    lr_gen: float = 2e-5
    lr_critic: float = 2e-5
    ratio: int = 5  # critic updates per generator update
    clip: float = 10.0
    shift: float = SHIFT
    t_min: float = 0.02
    t_max: float = 0.98
    steps: tuple[int, ...] = STUDENT_STEPS
    weight_decay: float = 0.01


def rollout(gen_dit, ctx: torch.Tensor, noise: torch.Tensor, exit_step: int, sched: StepDistillScheduler,
            grad: bool = True) -> torch.Tensor:
    """x0 predicted at `exit_step` of the deterministic sampler; only that forward carries gradient."""
    x = noise
    for i in range(exit_step + 1):
        t = sched.timesteps[i].float().expand(x.shape[0])
        sigma = sched.sigmas[i].float().expand(x.shape[0])
        if i < exit_step:
            with torch.no_grad():
                x = sched.step(i, gen_dit(x, t, ctx).float(), x)
        else:
            with torch.set_grad_enabled(grad):
                return x0_from_flow(x, gen_dit(x, t, ctx).float(), sigma)
    raise AssertionError("unreachable")


class DMD:
    """The DMD trainer: one object holding the three networks, their optimizers and the step counters."""

    def __init__(self, teacher, critic, generator, cfg: DMDConfig, seed: int = 0, rollout_fn=None):
        self.rollout = rollout_fn or rollout  # the causal student passes the KV-cache rollout
        self.teacher = teacher.eval().requires_grad_(False)
        self.critic, self.gen = critic, generator
        self.cfg = cfg
        self.sched = StepDistillScheduler(list(cfg.steps), cfg.shift, "deterministic")
        self.opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.lr_critic, betas=(0.0, 0.999),
                                       weight_decay=cfg.weight_decay)
        self.opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.lr_gen, betas=(0.0, 0.999),
                                       weight_decay=cfg.weight_decay)
        self.rng = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.gen_updates = 0

    # ---- pieces ---------------------------------------------------------------------------------
    def _noise(self, b: int, shape) -> torch.Tensor:
        return torch.randn((b, *shape), generator=self.rng)

    def _exit_step(self) -> int:
        return int(torch.randint(0, len(self.sched), (1,), generator=self.rng))

    def _noised(self, x: torch.Tensor):
        sigma = sample_sigma(x.shape[0], self.rng, self.cfg.shift, self.cfg.t_min, self.cfg.t_max)
        eps = torch.randn(x.shape, generator=self.rng)
        return add_noise(x, eps, sigma), sigma, eps

    @torch.no_grad()
    def real_x0(self, xt, t, sigma, ctx, ctx_null) -> torch.Tensor:
        out = self.teacher(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([ctx, ctx_null])).float()
        cond, uncond = x0_from_flow(torch.cat([xt, xt]), out, torch.cat([sigma, sigma])).chunk(2)
        return cond + self.cfg.guidance * (cond - uncond)

    def generator_loss(self, ctx, ctx_null, shape) -> tuple[torch.Tensor, dict]:
        x = self.rollout(self.gen, ctx, self._noise(ctx.shape[0], shape), self._exit_step(), self.sched, grad=True)
        with torch.no_grad():
            xt, sigma, _ = self._noised(x.detach())
            t = sigma * 1000
            fake = x0_from_flow(xt, self.critic(xt, t, ctx).float(), sigma)
            real = self.real_x0(xt, t, sigma, ctx, ctx_null)
            norm = (x.detach() - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((fake - real) / norm)
        loss = 0.5 * F.mse_loss(x.double(), (x.double() - grad.double()).detach())
        return loss.float(), {"dmd_grad_norm": grad.norm().item() / x.shape[0] ** 0.5,
                              "gen_x_std": x.detach().std().item()}

    def critic_loss(self, ctx, shape, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            with torch.no_grad():
                x = self.rollout(self.gen, ctx, self._noise(ctx.shape[0], shape), self._exit_step(), self.sched,
                                 grad=False)
        xt, sigma, eps = self._noised(x)
        v = self.critic(xt, sigma * 1000, ctx).float()
        return F.mse_loss(v, eps - x)

    # ---- one iteration: a critic update, and every `ratio`-th iteration a generator update first -------
    def step(self, ctx_fn, batch: int, shape=LATENT_SHAPE) -> dict:
        """ctx_fn(batch) -> (ctx, ctx_null). Returns the losses of this iteration."""
        cfg = self.cfg
        out = {}
        self.gen.train()
        self.critic.train()
        if self.iteration % cfg.ratio == 0:
            ctx, ctx_null = ctx_fn(batch)
            self.critic.requires_grad_(False)
            loss_g, info = self.generator_loss(ctx, ctx_null, shape)
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            out["gen_grad_norm"] = torch.nn.utils.clip_grad_norm_(self.gen.parameters(), cfg.clip).item()
            self.opt_g.step()
            self.critic.requires_grad_(True)
            self.gen_updates += 1
            out |= {"loss_gen": loss_g.item(), **info}
        ctx, _ = ctx_fn(batch)
        loss_c = self.critic_loss(ctx, shape)
        self.opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        out["critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.clip).item()
        self.opt_c.step()
        out["loss_critic"] = loss_c.item()
        self.iteration += 1
        return out

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "generator": self.gen.state_dict(),
                "opt_c": self.opt_c.state_dict(), "opt_g": self.opt_g.state_dict(), "rng": self.rng.get_state(),
                "iteration": self.iteration, "gen_updates": self.gen_updates}

    def load_state_dict(self, sd: dict) -> None:
        self.critic.load_state_dict(sd["critic"])
        self.gen.load_state_dict(sd["generator"])
        self.opt_c.load_state_dict(sd["opt_c"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.rng.set_state(sd["rng"])
        self.iteration, self.gen_updates = sd["iteration"], sd["gen_updates"]


def prompt_sampler(text: TextCache, seed: int):
    """Data-free training: prompts drawn uniformly from the grammar; uncond = the pipeline's negative prompt."""
    prompts = data.all_prompts()
    g = torch.Generator().manual_seed(seed)
    neg = null_prompts()[1]

    def fn(b: int):
        idx = torch.randint(0, len(prompts), (b,), generator=g).tolist()
        return text([prompts[i] for i in idx]), text([neg] * b)
    fn.generator = g
    return fn


def run_dmd(stage: str, out: Path, args, dmd: DMD, ema: EMA, sampler, eval_fn) -> Path:
    """The resumable DMD loop (bidirectional and causal students alike) up to `args.gen_steps` generator updates.

    out/ckpt.pt holds the three networks' trainable state, optimizers, the DMD and prompt RNGs and the
    EMA; eval_fn(model) -> dict scores the generator and its EMA every `args.eval_every` updates (and at the
    start and end). Writes out/student_final.pt ({"state": generator, "ema": its EMA}) and summary.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)  # our own file: tensors, optimizer and RNG states
        dmd.load_state_dict(ck["dmd"])
        ema.load_state_dict(ck["ema"])
        sampler.generator.set_state(ck["prompt_rng"])
        set_rng_state(ck["rng"])
        print(f"resumed {stage} at generator update {dmd.gen_updates}", flush=True)
    log = Log(out / "log.jsonl", args.gen_steps, dmd.gen_updates, desc=stage, quiet=args.quiet)
    t0 = time.time()
    if dmd.gen_updates == 0 and args.eval_every:
        res = eval_fn(dmd.gen)
        log.step(0, **{f"eval_{k}": v for k, v in res.items()})
        print(f"{stage} start: eval {res}", flush=True)
    acc: dict[str, list] = {}
    while dmd.gen_updates < args.gen_steps:
        before = dmd.gen_updates
        for k, v in dmd.step(sampler, args.batch).items():
            acc.setdefault(k, []).append(v)
        if dmd.gen_updates == before:
            continue
        ema.update(dmd.gen)
        n = dmd.gen_updates
        log.advance()
        if n % args.log_every == 0 or n == args.gen_steps:
            log.step(n, iteration=dmd.iteration, **{k: sum(v) / len(v) for k, v in acc.items()})
            acc = {}
        if n % args.ckpt_every == 0 or n == args.gen_steps:
            save_atomic({"dmd": dmd.state_dict(), "ema": ema.state_dict(), "prompt_rng": sampler.generator.get_state(),
                         "rng": rng_state()}, ckpt_path)
        if args.eval_every and (n % args.eval_every == 0 or n == args.gen_steps):
            res, res_ema = eval_fn(dmd.gen), eval_fn(dit_from_state(ema.shadow))
            log.step(n, **{f"eval_{k}": v for k, v in res.items()}, **{f"eval_ema_{k}": v for k, v in res_ema.items()})
            print(f"{stage} update {n}: eval {res} ema {res_ema}", flush=True)
    log.close()
    return save_final(out / "student_final.pt", dmd.gen.state_dict(),
                      {"gen_updates": dmd.gen_updates, "iterations": dmd.iteration,
                       "train_seconds_this_run": round(time.time() - t0, 1)},
                      ema={k: v.clone() for k, v in ema.shadow.items()}, gen_updates=dmd.gen_updates)


def train(args) -> Path:
    from .ode import latest_student
    from .teacher import load_teacher
    from .vae import load_trained_vae
    setup(args.threads, args.seed, stage_device(args, cpu_only="dmd"))
    root = Path(args.out)
    teacher = load_teacher(root)
    critic = copy.deepcopy(teacher).requires_grad_(True)
    generator = latest_student(root, ("ode-init",))[1].requires_grad_(True)
    cfg = DMDConfig(guidance=args.guidance, lr_gen=args.lr_gen, lr_critic=args.lr_critic, ratio=args.ratio)
    dmd = DMD(teacher, critic, generator, cfg, seed=args.seed)
    text = TextCache(root)
    vae = load_trained_vae(root / "vae" / "vae_final.pt")
    return run_dmd(STAGE, root / STAGE, args, dmd, EMA(generator, args.ema), prompt_sampler(text, args.seed + 1),
                   lambda m: evaluate_student(m, vae, text))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gen-steps", type=int, default=300, help="generator updates (x ratio critic updates)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=4.0, help="code-form s (CFG scale 1 + s)")
    ap.add_argument("--lr-gen", type=float, default=2e-5)
    ap.add_argument("--lr-critic", type=float, default=2e-5)
    ap.add_argument("--ratio", type=int, default=5)
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=6)
