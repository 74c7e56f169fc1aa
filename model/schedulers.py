"""Flow-matching samplers: Wan2.1's UniPC, LightX2V's step-distill (4-step and CausVid lists), plain Euler.

Every Wan2.1 model is a flow-matching model: x_σ = (1 − σ)·x0 + σ·ε, and the DiT fed t ≈ 1000·σ predicts
v = ε − x0. The samplers differ only in which σ they visit and how they move between them, behind one
small interface (`Sampler`: `timesteps`, `sigmas`, `len()`, `step`); classifier-free guidance is the
pipeline's business. `make_sampler(cfg)` picks the one a config's model class asks for (model/registry.py).
Pure torch; no diffusers import. The samplers' references and precision: ARCHITECTURE.md.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Protocol, runtime_checkable

import torch

from . import registry
from .config import NUM_TRAIN_TIMESTEPS, RunConfig, shift_sigma

log = logging.getLogger(__name__)

RENOISE_MODES = ("deterministic", "fresh_noise")


@runtime_checkable
class Sampler(Protocol):
    """What a pipeline needs from a sampler."""

    timesteps: torch.Tensor  # [N] float64: the timestep the DiT is fed at step i
    sigmas: torch.Tensor  # [N+1] float64: σ_0 … σ_{N-1}, then the final 0

    def __len__(self) -> int:
        """Number of DiT calls (per CFG branch)."""
        ...

    def step(self, i: int, flow: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The sample to feed at step i+1 (the clean latent after the last step)."""
        ...

    def reset(self) -> None:
        """Forget any multistep history (start a new video)."""
        ...


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------
def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps = {steps!r}: must be an integer >= 1")
    return steps


def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift = {shift!r}: must be a finite number > 0")
    return float(shift)


def _linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """float64 linspace computed as numpy does it (start + k·step, last value = stop).

    The reference grids are numpy linspaces; torch.linspace rounds differently in the last bit on the
    second half of the range, and a last-bit difference can flip an int-truncated timestep.
    """
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


def _work_dtype(sample: torch.Tensor) -> torch.dtype:
    """Update math runs in float32 at least (float64 stays float64), as every reference does."""
    return torch.promote_types(sample.dtype, torch.float32)


class _FlowSampler:
    """Bookkeeping common to the samplers: length, index and shape checks."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        pass

    def _check_step(self, i, flow: torch.Tensor, sample: torch.Tensor) -> None:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"step index i = {i!r}: must be an integer in [0, {n}) for this {n}-step sampler")
        if flow.shape != sample.shape:
            raise ValueError(f"flow shape {tuple(flow.shape)} must equal sample shape {tuple(sample.shape)}")

    def __repr__(self) -> str:
        ts = ", ".join(f"{t:g}" for t in self.timesteps[:6].tolist())
        more = ", …" if len(self) > 6 else ""
        return f"{type(self).__name__}(steps={len(self)}, timesteps=[{ts}{more}])"


# --------------------------------------------------------------------------------------------------
# Wan2.1's multistep UniPC
# --------------------------------------------------------------------------------------------------
class FlowUniPCScheduler(_FlowSampler):
    """Wan2.1's base sampler (`FlowUniPCMultistepScheduler` with `set_timesteps(steps, shift=shift)`).

    Grid. Wan builds a 1000-point training grid σ = 1 − linspace(1, 1/1000, 1000) reversed, stores it in
    float32, and samples `linspace(σ_max, 0, steps+1)[:-1]` with σ_max = float32(0.999) = 0.99900001287…
    (not 0.999, and not diffusers' 1.0). Those σ are shifted (σ' = s·σ/(1+(s−1)·σ)) in float64, the
    timesteps fed to the model are `int64(σ'·1000)` — truncated, so 50 steps/shift 5 start 999, 995, …
    and end 172, 92 — and the σ used by the update are σ' rounded to float32, followed by a final 0.
    `sigmas` holds exactly those float32 values (as float64); `timesteps` holds the truncated integers
    as floats.

    Update (solver order 2, B(h) = expm1 ("bh2"), x0-prediction), with λ(σ) = log(1−σ) − log(σ) and
    m_i = x_i − σ_i·v_i the x0 predicted at step i:
      UniC corrector (from the 2nd step on) first refines the sample the model just saw, using the
        previous sample, m_{i−1} (and m_{i−2}) and the new m_i; its order is the previous predictor's.
      UniP predictor then steps to σ_{i+1}: order 1 at the first step (warm-up) and the last step
        (`lower_order_final`), order 2 otherwise; the last step lands on σ = 0 and returns m_{N−1}.
    Only the corrected sample is kept; the model is never re-evaluated on it (one DiT call per step).

    Precision. The reference does all of this in float32: float32 σ, float32 λ/h/expm1 scalars and float32
    tensors. We do the same (`math_dtype=torch.float32`, the default) because Wan's outputs were produced
    that way. The scalar rounding is visible (λ ≈ −8.5 at the start, so h = λ_{i+1} − λ_i keeps only ~5
    significant digits): float64 scalars drift ~7e-7 from Wan over 50 steps. `math_dtype=torch.float64`
    is offered for analysis. Tensors are processed in float32 (float64 inputs stay float64) and returned
    in the input dtype.

    The scheduler is stateful: call `step(0, …)`, `step(1, …)`, … in order, always on the sample the
    previous step returned. `step(0, …)` (or `reset()`) starts a new video.
    """

    solver_order = 2

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 math_dtype: torch.dtype = torch.float32):
        steps = _check_steps(steps)
        shift = _check_shift(shift)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps = {num_train_timesteps!r}: must be an integer >= 2")
        if math_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"math_dtype = {math_dtype}: must be torch.float32 or torch.float64")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.math_dtype = math_dtype

        # σ_max: the first training σ, 1 − 1/T, as the float32 the reference stores it in.
        sigma_max = torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32).item()
        sig = shift_sigma(_linspace(sigma_max, 0.0, steps + 1)[:-1], shift)  # float64
        self.timesteps = torch.trunc(sig * num_train_timesteps)  # Wan: .astype(int64) truncates
        sig32 = torch.cat([sig.to(torch.float32), torch.zeros(1, dtype=torch.float32)])
        if not bool((sig32[:-1] < 1).all()) or not bool((sig32[:-1] > 0).all()):
            raise ValueError(f"shift = {shift}: out of range, the float32 σ grid degenerates (a σ rounds to 1 or 0)")
        self.sigmas = sig32.to(torch.float64)

        # Per-step scalars in the math dtype: σ, α = 1 − σ, λ = log α − log σ (λ_N = +inf is never used).
        s = sig32.to(math_dtype)
        self._sigma = s
        self._alpha = 1 - s
        self._lambda = torch.log(self._alpha) - torch.log(s)
        self.reset()

    def reset(self) -> None:
        self._next = 0  # the step index expected next
        self._m: list[torch.Tensor] = []  # x0 predictions of the last (up to) two steps, oldest first
        self._last_sample: torch.Tensor | None = None  # the sample the last predictor started from
        self._last_order = 0  # the last predictor's order

    def _order(self, i: int) -> int:
        # warm-up (order 1 at step 0) and lower_order_final (order 1 at the last step)
        return min(self.solver_order, i + 1, len(self) - i)

    def _corrector(self, i: int, m_new: torch.Tensor) -> torch.Tensor:
        """UniC: the refined sample at σ_i, from the sample at σ_{i−1} and the x0 predictions m."""
        x = self._last_sample
        m0 = self._m[-1]  # x0 predicted at step i−1
        h = self._lambda[i] - self._lambda[i - 1]
        phi = torch.expm1(-h)  # e^{−h} − 1 < 0; also B(h) for bh2
        a = self._alpha[i]
        base = (self._sigma[i] / self._sigma[i - 1]) * x - (a * phi) * m0
        d_new = m_new - m0
        if self._last_order == 1:
            return base - (a * phi * 0.5) * d_new
        # order 2: ρ solves UniC's order conditions [[1, 1], [r, 1]]·ρ = [b1, b2], where
        # k1 = φ/(−h) − 1, k2 = k1/(−h) − 1/2, b1 = k1/B(h), b2 = 2·k2/B(h)
        r = (self._lambda[i - 2] - self._lambda[i - 1]) / h
        d_old = (self._m[-2] - m0) / r
        k1 = phi / -h - 1
        b1 = k1 / phi
        b2 = 2 * (k1 / -h - 0.5) / phi
        rho_old = (b1 - b2) / (1 - r)
        rho_new = b1 - rho_old
        return base - (a * phi) * (rho_old * d_old + rho_new * d_new)

    def _predictor(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: from the sample x at σ_i to σ_{i+1}."""
        m0 = self._m[-1]
        if self.sigmas[i + 1] == 0:
            # σ_{i+1} = 0 (only at the last step, where the order is 1): λ = +inf, expm1(−inf) = −1 and the
            # update reduces exactly to the x0 prediction. Returned directly instead of computing with inf.
            return m0
        h = self._lambda[i + 1] - self._lambda[i]
        phi = torch.expm1(-h)
        a = self._alpha[i + 1]
        out = (self._sigma[i + 1] / self._sigma[i]) * x - (a * phi) * m0
        if order == 2:
            r = (self._lambda[i - 1] - self._lambda[i]) / h
            d = (self._m[-2] - m0) / r
            out = out - (a * phi * 0.5) * d
        return out

    def step(self, i: int, flow: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_step(i, flow, sample)
        if i == 0:
            self.reset()
        elif i != self._next:
            raise ValueError(f"step index i = {i}: UniPC is multistep and must be stepped in order; expected "
                             f"i = {self._next} (or 0 to start a new video)")
        dtype = _work_dtype(sample)
        x = sample.to(dtype)
        m = x - self._sigma[i] * flow.to(dtype)  # x0 prediction
        if i > 0:
            x = self._corrector(i, m)
        self._m = (self._m + [m])[-self.solver_order:]
        order = self._order(i)
        self._last_sample, self._last_order = x, order
        out = self._predictor(i, x, order)
        self._next = i + 1
        return out.to(sample.dtype)


# --------------------------------------------------------------------------------------------------
# LightX2V's step-distill sampler
# --------------------------------------------------------------------------------------------------
class StepDistillScheduler(_FlowSampler):
    """LightX2V's `WanStepDistillScheduler` (and Self-Forcing's fresh-noise variant).

    Grid. The 1000-point training grid σ = linspace(1, 0, 1001)[:-1] is shifted, and each listed
    timestep t picks grid index 1000 − t, i.e. σ = shift(t/1000). The DiT is fed σ·1000 as a float, not
    truncated: [1000, 750, 500, 250] with shift 5 gives t = 1000, 937.5, 833.33…, 625 (Self-Forcing's
    "warped" list). LightX2V builds the grid in float32; we build it in float64 (differences ~1e-7·σ).
    With warp=False the list is taken as model timesteps already: σ = t/1000 and the DiT is fed t
    (CausVid's released configs, and LightX2V's CausVid runner while it had one).

    Step i: x0 = x − σ_i·v, then
      deterministic (LightX2V): x_{i+1} = x0 + σ_{i+1}·v — the Euler jump, re-noised with the model's
        own noise estimate;
      fresh_noise (Self-Forcing): x_{i+1} = (1 − σ_{i+1})·x0 + σ_{i+1}·ε with a fresh ε ~ N(0, I) drawn
        in float32 from the `generator` passed to `step` (required), on the generator's device;
    and the last step returns x0. Stateless between steps.
    """

    def __init__(self, denoising_step_list, shift: float, renoise: str = "deterministic", warp: bool = True):
        shift = _check_shift(shift)
        steps = self._check_list(denoising_step_list)
        if renoise not in RENOISE_MODES:
            raise ValueError(f"renoise = {renoise!r}: must be one of {', '.join(RENOISE_MODES)}")
        self.denoising_step_list = steps
        self.shift = shift
        self.renoise = renoise
        self.warp = bool(warp)

        if self.warp:
            grid = shift_sigma(_linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1], shift)  # float64, σ(1000)=1 first
            sig = grid[[NUM_TRAIN_TIMESTEPS - t for t in steps]]
        else:
            sig = torch.tensor(steps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
        self.timesteps = sig * NUM_TRAIN_TIMESTEPS
        self.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])

    @staticmethod
    def _check_list(steps) -> list[int]:
        if steps is None or isinstance(steps, (str, bytes)) or len(steps) == 0:
            raise ValueError(f"denoising_step_list = {steps!r}: must be a non-empty list of timesteps")
        out = []
        for t in steps:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or t != int(t):
                raise ValueError(f"denoising_step_list = {list(steps)}: {t!r} is not an integer timestep "
                                 "(each selects one point of the 1000-point grid)")
            out.append(int(t))
        if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in out):
            raise ValueError(f"denoising_step_list = {out}: every timestep must be in (0, {NUM_TRAIN_TIMESTEPS}]")
        if any(a <= b for a, b in itertools.pairwise(out)):
            raise ValueError(f"denoising_step_list = {out}: timesteps must be strictly decreasing")
        return out

    def step(self, i: int, flow: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_step(i, flow, sample)
        last = i == len(self) - 1
        if self.renoise == "fresh_noise" and not last and generator is None:
            raise ValueError("renoise = 'fresh_noise' draws new noise at every step but the last: pass a "
                             "torch.Generator to step()")
        dtype = _work_dtype(sample)
        v = flow.to(dtype)
        x0 = sample.to(dtype) - self.sigmas[i].item() * v
        if last:
            return x0.to(sample.dtype)
        s_next = self.sigmas[i + 1].item()
        if self.renoise == "deterministic":
            out = x0 + s_next * v
        else:
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=generator.device)
            out = (1 - s_next) * x0 + s_next * eps.to(device=x0.device, dtype=dtype)
        return out.to(sample.dtype)


# --------------------------------------------------------------------------------------------------
# Plain Euler
# --------------------------------------------------------------------------------------------------
class EulerFlowScheduler(_FlowSampler):
    """First-order flow-matching ODE step: x_{i+1} = x_i + (σ_{i+1} − σ_i)·v.

    Grid as Wan's dpm++ sampler: σ = shift(linspace(1, 0, steps+1)), so σ_0 = 1 and the final σ is 0;
    the DiT is fed the float σ·1000 (as Self-Forcing/CausVid's FlowMatchScheduler; Wan's dpm++
    truncates to int). The last step lands on σ = 0, i.e. returns x − σ·v = x0. Exact when the flow is
    constant along the path. Stateless.
    """

    def __init__(self, steps: int, shift: float):
        steps = _check_steps(steps)
        self.shift = _check_shift(shift)
        self.sigmas = shift_sigma(_linspace(1.0, 0.0, steps + 1), self.shift)
        self.timesteps = self.sigmas[:-1] * NUM_TRAIN_TIMESTEPS

    def step(self, i: int, flow: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_step(i, flow, sample)
        dtype = _work_dtype(sample)
        dt = (self.sigmas[i + 1] - self.sigmas[i]).item()
        return (sample.to(dtype) + dt * flow.to(dtype)).to(sample.dtype)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------
def make_sampler(cfg: RunConfig, task: str | None = None) -> Sampler:
    """The sampler a LightX2V config asks for (a fresh instance: one per video), as its model class says
    (model/registry.py: `sampler`, `default_steps`, `renoise`, `warp`).

    "unipc" (the base model) → Wan's UniPC with `infer_steps` and `sample_shift` (T2V and I2V differ only in
    the shift, which the config carries: Wan uses 5 for T2V/720p I2V and 3 for 480p I2V); with LightX2V's
    extra key `"scheduler_type": "WanStepDistillScheduler"` (how LightX2V runs a base model with a distill
    LoRA) the distill student's sampler instead.
    "step_distill" → the step-distill sampler over `denoising_step_list` (default: the class's list, e.g.
    [1000, 750, 500, 250], or CausVid's [999, 934, …, 74] run once per block) with `sample_shift`, and
    `renoise` / `warp_denoising_step` unless the config sets them.
    """
    task = task or cfg.task
    if task not in ("t2v", "i2v"):
        raise ValueError(f"task = {task!r}: must be t2v or i2v")
    mc = registry.model_class(cfg.model_cls)
    if mc.sampler == "unipc" and cfg.extras.get("scheduler_type") == "WanStepDistillScheduler":
        mc = registry.DISTILL
    if mc.sampler == "unipc":
        if cfg.denoising_step_list:
            log.warning("denoising_step_list is ignored for model_cls=%s (UniPC runs infer_steps=%d); use a "
                        "step-distilled model class (%s) for a step list", cfg.model_cls, cfg.infer_steps,
                        ", ".join(m.name for m in registry.MODEL_CLASSES.values() if m.sampler == "step_distill"))
        return FlowUniPCScheduler(cfg.infer_steps, cfg.sample_shift)
    if mc.sampler == "step_distill":
        steps = cfg.denoising_step_list or list(mc.default_steps)
        warp = mc.warp if cfg.warp_denoising_step is None else cfg.warp_denoising_step
        return StepDistillScheduler(steps, cfg.sample_shift, cfg.renoise or mc.renoise, warp)
    raise ValueError(f"model_cls = {cfg.model_cls!r}: no sampler {mc.sampler!r}")
