"""Samplers: grids and timesteps equal the upstream values, updates equal the upstream formulas.

Wan2.1's UniPC is checked against diffusers' `UniPCMultistepScheduler` (the code Wan's own
`FlowUniPCMultistepScheduler` was copied from), the distill and Euler samplers against plain loops written
here from the LightX2V / Self-Forcing formulas.
"""
import math

import numpy as np
import pytest
import torch

from model.config import RunConfig
from model.schedulers import (
    EulerFlowScheduler,
    FlowUniPCScheduler,
    Sampler,
    StepDistillScheduler,
    make_sampler,
)

SHAPE = (1, 4, 3, 4, 5)  # [B, C, F, H, W]; diffusers' UniPC needs the batch dim


def shifted(u: float, s: float) -> float:
    return s * u / (1 + (s - 1) * u)


def toy_flow(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth nonlinear 'model' of (sample, timestep)."""
    t = float(t)
    return torch.sin(x) * (1 + t / 1000) + 0.3 * x - 0.1


def noise(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exact_flow_toy(seed=1, dtype=torch.float64):
    """x0, ε and the exact flow model v(x, σ) = ε − x0 of the straight path x_σ = (1−σ)·x0 + σ·ε."""
    x0 = noise(seed, dtype)
    eps = noise(seed + 100, dtype)
    return x0, eps, (lambda x, t: eps - x0)


# --------------------------------------------------------------------------------------------------
# StepDistillScheduler
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,shift", [
    ([1000, 750, 500, 250], 5.0),
    ([999, 750, 500, 250], 5.0),
    ([999, 934, 862, 756, 603, 410, 250, 140, 74], 8.0),  # LightX2V's CausVid list
])
def test_distill_grid_matches_formula(steps, shift):
    s = StepDistillScheduler(steps, shift)
    want = [shifted(t / 1000, shift) for t in steps]
    assert len(s) == len(steps)
    assert s.sigmas.dtype == torch.float64 and s.timesteps.dtype == torch.float64
    assert s.sigmas.tolist()[-1] == 0.0 and len(s.sigmas) == len(steps) + 1
    assert np.abs(np.array(s.sigmas.tolist()[:-1]) - want).max() <= 1e-9
    assert np.abs(np.array(s.timesteps.tolist()) - np.array(want) * 1000).max() <= 1e-9 * 1000


def test_distill_warped_timesteps_explicit():
    t = StepDistillScheduler([1000, 750, 500, 250], 5).timesteps.tolist()
    assert abs(t[0] - 1000) <= 1e-9 and abs(t[1] - 937.5) <= 1e-9
    assert abs(t[2] - 2500 / 3) <= 1e-9 and abs(t[3] - 625) <= 1e-9
    t = StepDistillScheduler([999, 750, 500, 250], 5).timesteps.tolist()
    assert abs(t[0] - 1000 * 4.995 / 4.996) <= 1e-9  # raw σ 0.999


def test_distill_grid_close_to_lightx2v_float32_grid():
    # LightX2V builds the grid with float32 torch.linspace; we use float64: the model inputs differ by < 1e-4.
    steps, shift = [1000, 750, 500, 250], 5.0
    g = torch.linspace(1.0, 0.0, 1001)[:-1]
    g = shift * g / (1 + (shift - 1) * g)
    ref = (g * 1000)[[1000 - t for t in steps]]
    assert (StepDistillScheduler(steps, shift).timesteps - ref.double()).abs().max() < 1e-4


def lightx2v_loop(steps, shift, x, model, renoise="deterministic", generator=None):
    """LightX2V's step_post (and Self-Forcing's add_noise) written out, with σ from the closed form."""
    sig = [shifted(t / 1000, shift) for t in steps]
    for i, s in enumerate(sig):
        v = model(x, s * 1000)
        x0 = x - s * v
        if i == len(sig) - 1:
            return x0
        if renoise == "deterministic":
            x = x0 + sig[i + 1] * v
        else:
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
            x = (1 - sig[i + 1]) * x0 + sig[i + 1] * eps


def run(sampler, x, model, generator=None, trace=None):
    for i in range(len(sampler)):
        x = sampler.step(i, model(x, sampler.timesteps[i]), x, generator=generator)
        if trace is not None:
            trace.append(x)
    return x


@pytest.mark.parametrize("steps", [[1000, 750, 500, 250], [999, 750, 500, 250], [1000]])
def test_distill_deterministic_equals_lightx2v_loop(steps):
    x = noise()
    ours = run(StepDistillScheduler(steps, 5.0), x, toy_flow)
    ref = lightx2v_loop(steps, 5.0, x, toy_flow)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours.dtype == torch.float32


def test_distill_fresh_noise_equals_selfforcing_loop():
    steps = [1000, 750, 500, 250]
    x = noise()
    s = StepDistillScheduler(steps, 5.0, renoise="fresh_noise")
    ours = run(s, x, toy_flow, torch.Generator().manual_seed(7))
    ref = lightx2v_loop(steps, 5.0, x, toy_flow, "fresh_noise", torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    again = run(s, x, toy_flow, torch.Generator().manual_seed(7))
    assert torch.equal(ours, again)  # same seed -> identical
    other = run(s, x, toy_flow, torch.Generator().manual_seed(8))
    assert (ours - other).abs().max() > 1e-3  # the noise matters
    det = run(StepDistillScheduler(steps, 5.0), x, toy_flow)
    assert (ours - det).abs().max() > 1e-3


@pytest.mark.parametrize("renoise", ["deterministic", "fresh_noise"])
def test_distill_last_step_returns_x0(renoise):
    s = StepDistillScheduler([1000, 750, 500, 250], 5.0, renoise)
    x, v = noise(1), noise(2)
    out = s.step(3, v, x)  # the last step draws nothing, so needs no generator
    torch.testing.assert_close(out, x - s.sigmas[3].item() * v, rtol=0, atol=0)
    assert s.sigmas[4] == 0


def test_distill_deterministic_recovers_x0_with_exact_flow():
    x0, eps, model = exact_flow_toy()
    out = run(StepDistillScheduler([1000, 750, 500, 250], 5.0), eps, model)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("renoise", ["deterministic", "fresh_noise"])
def test_distill_recovers_x0_with_perfect_denoiser(renoise):
    # a model whose x0 prediction is always x0 (v = (x − x0)/σ): every step lands on x0's path, any noise
    x0 = noise(1, torch.float64)
    model = lambda x, t: (x - x0) / (float(t) / 1000)
    s = StepDistillScheduler([999, 750, 500, 250], 5.0, renoise)
    trace = []
    out = run(s, noise(2, torch.float64), model, torch.Generator().manual_seed(0), trace)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    if renoise == "fresh_noise":  # the re-noised samples carry the generator's noise, not the model's
        g = torch.Generator().manual_seed(0)
        for i, xi in enumerate(trace[:-1]):
            sig = s.sigmas[i + 1].item()
            eps = torch.randn(SHAPE, generator=g, dtype=torch.float32).double()
            torch.testing.assert_close(xi, (1 - sig) * x0 + sig * eps, rtol=0, atol=1e-12)


def test_distill_keeps_dtype_and_computes_in_float32():
    s = StepDistillScheduler([1000, 750, 500, 250], 5.0)
    x, v = noise(1).bfloat16(), noise(2).bfloat16()
    out = s.step(0, v, x)
    assert out.dtype == torch.bfloat16
    ref = (x.float() - 1.0 * v.float()) + s.sigmas[1].item() * v.float()
    assert torch.equal(out, ref.bfloat16())


# --------------------------------------------------------------------------------------------------
# FlowUniPCScheduler (Wan2.1)
# --------------------------------------------------------------------------------------------------
def test_unipc_wan_timesteps_t2v_50_shift5():
    s = FlowUniPCScheduler(50, 5.0)
    t = [int(v) for v in s.timesteps.tolist()]
    assert s.timesteps.dtype == torch.float64 and s.timesteps.tolist() == [float(v) for v in t]
    assert len(t) == 50 and len(s) == 50 and len(s.sigmas) == 51 and s.sigmas[-1] == 0
    assert t[:10] == [999, 995, 991, 987, 982, 978, 973, 968, 963, 957]
    assert t[-5:] == [356, 302, 241, 172, 92]
    assert abs(s.sigmas[0].item() - 0.9998) < 1e-4 and abs(s.sigmas[-2].item() - 0.09251) < 1e-5


def test_unipc_wan_timesteps_i2v_40_shift3():
    t = [int(v) for v in FlowUniPCScheduler(40, 3.0).timesteps.tolist()]
    assert t[:5] == [999, 991, 982, 973, 963]
    assert t[-4:] == [249, 195, 136, 71]


def test_unipc_sigmas_are_wans_float32_grid():
    # Wan: σ_max = float32(1 − 1/1000) (0.99900001287…, not 0.999), linspace(σ_max, 0, n+1)[:-1] in float64
    # (numpy), shifted, timesteps = int64(σ·1000), σ stored as float32.
    n, shift = 50, 5.0
    sigma_max = float(np.float32(0.999))
    raw = np.linspace(sigma_max, 0, n + 1)[:-1]
    sig = shift * raw / (1 + (shift - 1) * raw)
    s = FlowUniPCScheduler(n, shift)
    assert s.timesteps.tolist() == (sig * 1000).astype(np.int64).astype(np.float64).tolist()
    assert s.sigmas.tolist() == np.append(sig, 0).astype(np.float32).astype(np.float64).tolist()


def diffusers_unipc(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    d = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    return d


def test_diffusers_default_grid_is_not_wans():
    # diffusers' `set_timesteps(n)` with use_flow_sigmas samples linspace(1, 1/1000, n+1)[:-1] (and nudges
    # a shifted first σ of exactly 1 down by 1e-6), Wan samples linspace(float32(0.999), 0, n+1)[:-1]: the raw
    # grids agree only at the first point (to 1e-3), so the shifted σ differ by up to ~4e-3 and the timesteps
    # at the end differ (diffusers' 50/5 ends 359, 305, 244, 175, 96; Wan's 356, 302, 241, 172, 92). Both
    # truncate timesteps to int64 (diffusers' UniPC too, unlike its FlowMatchEuler scheduler). diffusers'
    # WanPipeline therefore does not sample Wan's grid; passing Wan's raw grid as `sigmas=` does (below).
    n, shift = 50, 5.0
    d = diffusers_unipc(n, shift)
    d.set_timesteps(n)
    sig = shifted(np.linspace(1, 1 / 1000, n + 1)[:-1], shift)
    sig[0] -= 1e-6  # after the shift: a shifted first σ of 1 would make log(σ)-log(1-σ) infinite
    assert np.abs(d.sigmas.numpy() - np.append(sig, 0).astype(np.float32)).max() == 0
    assert d.timesteps.dtype == torch.int64
    assert d.timesteps[-5:].tolist() == [359, 305, 244, 175, 96]
    ours = FlowUniPCScheduler(n, shift)
    diff = (d.sigmas.double() - ours.sigmas).abs().max().item()
    assert 1e-3 < diff < 1e-2


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (40, 3.0), (4, 5.0), (3, 5.0), (2, 5.0), (1, 5.0)])
@pytest.mark.parametrize("math_dtype", [torch.float32, torch.float64])
def test_unipc_equals_diffusers(steps, shift, math_dtype):
    """Same model on each scheduler's own sample; every intermediate sample within 1e-5.

    diffusers gets Wan's grid through `set_timesteps(sigmas=linspace(float32(0.999), 0, n+1)[:-1])` (it
    shifts them itself); then its σ (float32) and int64 timesteps equal ours exactly. Measured max |diff|
    (fp32 inputs, |x| ≲ 3): float32 math (default, as Wan) 6e-8 at 50/5, 3e-8 at 40/3, 6e-8 at 4/5, 0 for
    ≤3 steps; float64 math 7e-7 at 50/5, 5e-7 at 40/3, 1e-7 at 3-4 steps. The last step (σ_next = 0, order 1 by
    lower_order_final) returns the x0 prediction in both: diffusers computes it through λ = +inf,
    expm1(−inf) = −1, which reduces exactly to x0; we return it directly.
    """
    d = diffusers_unipc(steps, shift)
    d.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
    ours = FlowUniPCScheduler(steps, shift, math_dtype=math_dtype)
    assert torch.equal(d.sigmas.double(), ours.sigmas)
    assert torch.equal(d.timesteps.double(), ours.timesteps)

    a = b = noise()
    worst = 0.0
    for i in range(steps):
        t = ours.timesteps[i]
        a_in = a
        a = ours.step(i, toy_flow(a, t), a)
        b = d.step(toy_flow(b, d.timesteps[i]), d.timesteps[i], b, return_dict=False)[0]
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= 1e-5, worst
    # the last step returns the x0 predicted from the sample the model saw
    torch.testing.assert_close(a, a_in - ours.sigmas[steps - 1].float() * toy_flow(a_in, t), rtol=0, atol=0)


def test_unipc_recovers_x0_with_exact_flow():
    # on a straight path every x0 prediction is x0 and all difference terms vanish: UniPC is exact
    for math_dtype in (torch.float32, torch.float64):
        x0, eps, model = exact_flow_toy()
        s = FlowUniPCScheduler(20, 5.0, math_dtype=math_dtype)
        x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * eps
        trace = []
        out = run(s, x, model, trace=trace)
        tol = 1e-12 if math_dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, x0, rtol=0, atol=tol)
        for i, xi in enumerate(trace[:-1]):  # every intermediate sample is on the path
            sig = s.sigmas[i + 1]
            torch.testing.assert_close(xi, (1 - sig) * x0 + sig * eps, rtol=0, atol=tol)


def test_unipc_is_stateful_and_resets():
    s = FlowUniPCScheduler(10, 5.0)
    first = run(s, noise(), toy_flow)
    assert torch.equal(run(s, noise(), toy_flow), first)  # step(0) starts a new video
    s.reset()
    assert torch.equal(run(s, noise(), toy_flow), first)
    s.step(0, noise(1), noise())
    with pytest.raises(ValueError, match="in order; expected i = 1"):
        s.step(2, noise(1), noise())


def test_unipc_keeps_input_dtype():
    s = FlowUniPCScheduler(5, 5.0)
    out = s.step(0, noise(1).bfloat16(), noise().bfloat16())
    assert out.dtype == torch.bfloat16
    out = FlowUniPCScheduler(5, 5.0).step(0, noise(1, torch.float64), noise(0, torch.float64))
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# EulerFlowScheduler
# --------------------------------------------------------------------------------------------------
def test_euler_grid():
    s = EulerFlowScheduler(4, 5.0)
    assert s.sigmas.tolist()[0] == 1.0 and s.sigmas.tolist()[-1] == 0.0 and len(s.sigmas) == 5
    want = [shifted(u, 5.0) for u in (1.0, 0.75, 0.5, 0.25)]
    assert np.abs(np.array(s.timesteps.tolist()) - np.array(want) * 1000).max() <= 1e-9


def test_euler_equals_plain_loop():
    steps, shift = 8, 3.0
    x = ref = noise()
    sig = [shifted(1 - k / steps, shift) for k in range(steps + 1)]
    for i in range(steps):
        ref = ref + (sig[i + 1] - sig[i]) * toy_flow(ref, sig[i] * 1000)
    out = run(EulerFlowScheduler(steps, shift), x, toy_flow)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_euler_recovers_x0_with_exact_flow():
    x0, eps, model = exact_flow_toy()
    out = run(EulerFlowScheduler(7, 5.0), eps, model)  # σ_0 = 1: start from pure noise
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Factory and errors
# --------------------------------------------------------------------------------------------------
def test_make_sampler():
    s = make_sampler(RunConfig(model_cls="wan2.1", infer_steps=40, sample_shift=3.0, task="i2v"))
    assert isinstance(s, FlowUniPCScheduler) and isinstance(s, Sampler) and len(s) == 40 and s.shift == 3.0
    s = make_sampler(RunConfig(model_cls="wan2.1_distill", enable_cfg=False, sample_shift=5.0))
    assert isinstance(s, StepDistillScheduler) and s.denoising_step_list == [1000, 750, 500, 250]
    assert s.renoise == "deterministic" and isinstance(s, Sampler)
    s = make_sampler(RunConfig(model_cls="wan2.1_distill", enable_cfg=False, denoising_step_list=[999, 500],
                               renoise="fresh_noise"), "t2v")
    assert s.denoising_step_list == [999, 500] and s.renoise == "fresh_noise"
    # LightX2V runs a base model with a distill LoRA through this extra key
    s = make_sampler(RunConfig(model_cls="wan2.1", scheduler_type="WanStepDistillScheduler",
                               denoising_step_list=[1000, 750, 500, 250]))
    assert isinstance(s, StepDistillScheduler)
    assert isinstance(make_sampler(RunConfig(model_cls="wan2.1", denoising_step_list=[1000, 500])), FlowUniPCScheduler)
    assert isinstance(EulerFlowScheduler(2, 1.0), Sampler)
    # CausVid: the same sampler per block, over the CausVid list taken as model timesteps, fresh noise
    s = make_sampler(RunConfig(model_cls="wan2.1_causvid", enable_cfg=False, sample_shift=8.0))
    assert isinstance(s, StepDistillScheduler) and s.timesteps[0].item() == 999.0 and s.renoise == "fresh_noise"
    with pytest.raises(ValueError, match="task"):
        make_sampler(RunConfig(), "v2v")


@pytest.mark.parametrize("build,match", [
    (lambda: FlowUniPCScheduler(0, 5.0), r"steps = 0: must be an integer >= 1"),
    (lambda: EulerFlowScheduler(-1, 5.0), r"steps = -1: must be an integer >= 1"),
    (lambda: FlowUniPCScheduler(2.5, 5.0), r"steps = 2.5: must be an integer >= 1"),
    (lambda: FlowUniPCScheduler(10, 0.0), r"shift = 0.0: must be a finite number > 0"),
    (lambda: EulerFlowScheduler(10, -1), r"shift = -1: must be a finite number > 0"),
    (lambda: StepDistillScheduler([1000], math.nan), r"shift = nan: must be a finite number > 0"),
    (lambda: StepDistillScheduler([750, 1000], 5.0), r"strictly decreasing"),
    (lambda: StepDistillScheduler([1000, 500, 500], 5.0), r"strictly decreasing"),
    (lambda: StepDistillScheduler([1001, 500], 5.0), r"every timestep must be in \(0, 1000\]"),
    (lambda: StepDistillScheduler([1000, 0], 5.0), r"every timestep must be in \(0, 1000\]"),
    (lambda: StepDistillScheduler([], 5.0), r"non-empty"),
    (lambda: StepDistillScheduler([999.5], 5.0), r"not an integer timestep"),
    (lambda: StepDistillScheduler([1000], 5.0, renoise="sde"), r"renoise = 'sde': must be one of"),
])
def test_construction_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("sampler", [FlowUniPCScheduler(4, 5.0), StepDistillScheduler([1000, 500], 5.0),
                                     EulerFlowScheduler(4, 5.0)], ids=["unipc", "distill", "euler"])
def test_step_errors(sampler):
    x = noise()
    with pytest.raises(ValueError, match=r"step index i = 4: must be an integer in \[0, "):
        sampler.step(4, x, x)
    with pytest.raises(ValueError, match=r"step index i = -1"):
        sampler.step(-1, x, x)
    with pytest.raises(ValueError, match=r"flow shape \(1, 4, 3, 4, 4\) must equal sample shape"):
        sampler.step(0, x[..., :4], x)


def test_fresh_noise_needs_generator():
    s = StepDistillScheduler([1000, 500], 5.0, renoise="fresh_noise")
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        s.step(0, noise(1), noise())
    StepDistillScheduler([1000], 5.0, renoise="fresh_noise").step(0, noise(1), noise())  # nothing to draw
