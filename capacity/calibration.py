"""The efficiencies every projection uses, fitted to Wan2.1's published 14B 720p timings and peak memory.

Vendor peaks say what a GPU could do; the published times say what Wan2.1 got. Fitting three efficiencies
(MFU, VAE, collectives) and the VAE's working bytes per pixel to them anchors the model on measurements of
the same GPU generation. Why both tasks, and how well the fit pins each value: capacity/README.md.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from capacity.footprint import (
    clip_weight_bytes,
    dit_activation_bytes,
    dit_weight_bytes,
    t5_weight_bytes,
    vae_weight_bytes,
)
from capacity.hardware import GB, GPUS
from capacity.timing import Calibration, project_with, stage_terms
from capacity.workload import Workload


@dataclass(frozen=True)
class Published:
    gpus: int
    seconds: float
    peak_gb: float


# Wan2.1 README "Computational Efficiency on Different GPUs" (reference/wan_xdit.md section 7): total seconds /
# peak GB, 1280x720, 81 frames, CFG, T2V 50 steps, I2V 40 steps; 1 GPU: --offload_model True; 2/4/8 GPUs:
# --dit_fsdp --t5_fsdp --ulysses_size N (xDiT USP), no offload. Rows are labelled "H800/H100" and "A800/A100".
WAN21_PUBLISHED: dict[tuple[str, str], tuple[Published, ...]] = {
    ("H100", "t2v"): (Published(1, 1837.9, 69.1), Published(2, 945.1, 53.9),
                      Published(4, 497.0, 37.9), Published(8, 287.9, 29.9)),
    ("H100", "i2v"): (Published(1, 1491.6, 76.7), Published(2, 753.9, 59.8),
                      Published(4, 403.9, 41.9), Published(8, 238.8, 32.9)),
    ("A100", "t2v"): (Published(1, 3342.6, 69.1), Published(2, 1722.0, 52.5),
                      Published(4, 886.1, 36.6), Published(8, 469.9, 28.6)),
    ("A100", "i2v"): (Published(1, 2715.5, 76.7), Published(2, 1371.7, 58.5),
                      Published(4, 716.1, 40.6), Published(8, 389.7, 31.6)),
}
# Which published figures calibrate each GPU: its own where Wan2.1 published some (T2V and I2V), else the
# H100's. The H200 has the H100's tensor cores (its faster HBM makes that
# conservative); the L40S (Ada, PCIe only) has no published Wan timing: its projections are uncalibrated.
CALIBRATED_ON = {"H100": "H100", "H200": "H100", "A100": "A100", "L40S": "H100"}


def upstream_workload(gpus: int, task: str = "t2v") -> Workload:
    """How Wan2.1's generate.py ran the published points: fp32 DiT weights (bf16 autocast), T5 in bf16, the
    VAE on rank 0 alone (upstream does not split it: the fit stays on the unsplit VAE)."""
    return Workload(model="14B", task=task, width=1280, height=720, frames=81, steps=50 if task == "t2v" else 40,
                    cfg=True, ulysses=gpus, dtype="fp32", fsdp=gpus > 1, offload=gpus == 1, vae_parallel=False)


@dataclass(frozen=True)
class FitRow:
    task: str
    gpus: int
    published_s: float
    projected_s: float
    published_gb: float
    projected_gb: float

    @property
    def error(self) -> float:
        return self.projected_s / self.published_s - 1

    @property
    def memory_error(self) -> float:
        return self.projected_gb / self.published_gb - 1


@dataclass(frozen=True)
class Fit:
    calibration: Calibration
    rows: tuple[FitRow, ...]  # the fitted points
    comm_range: tuple[float, float]  # comm_eff values that still fit every point within RANGE_TOLERANCE

    @property
    def max_error(self) -> float:
        return max(abs(r.error) for r in self.rows)


RANGE_TOLERANCE = 0.05


def _bounded_least_squares(a: np.ndarray, b: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin |a x - b|^2 subject to x >= lower, by trying every set of variables pinned at their bound.

    Exact for a convex problem with few variables: the optimum's free variables solve the unconstrained
    problem with the pinned ones fixed, so the best feasible candidate is the optimum.
    """
    n = a.shape[1]
    best, best_cost = None, math.inf
    for pinned in itertools.chain.from_iterable(itertools.combinations(range(n), k) for k in range(n + 1)):
        x = lower.astype(float).copy()
        free = [i for i in range(n) if i not in pinned]
        if free:
            rhs = b - a[:, list(pinned)] @ x[list(pinned)]
            x[free] = np.linalg.lstsq(a[:, free], rhs, rcond=None)[0]
        if np.all(x >= lower - 1e-12):
            cost = float(np.sum((a @ x - b) ** 2))
            if cost < best_cost:
                best, best_cost = x, cost
    return best


def _fit_reciprocals(a: np.ndarray, fixed: np.ndarray, published: np.ndarray, comm_eff: float | None = None):
    """Reciprocal efficiencies (1/mfu, 1/vae_eff, 1/comm_eff) minimizing the squared relative errors.

    With comm_eff given, only the first two are fitted. Returns (reciprocals, relative errors).
    """
    rows, rhs = a / published[:, None], (published - fixed) / published
    if comm_eff is None:
        x = _bounded_least_squares(rows, rhs, np.ones(3))
    else:
        x = np.append(_bounded_least_squares(rows[:, :2], rhs - rows[:, 2] / comm_eff, np.ones(2)), 1 / comm_eff)
    return x, (a @ x + fixed) / published - 1


def _comm_range(a: np.ndarray, fixed: np.ndarray, published: np.ndarray, tolerance: float) -> tuple[float, float]:
    """The comm_eff values (on a 1 % geometric grid in [0.001, 1]) for which refitting mfu and vae_eff keeps
    every relative error within tolerance: how tightly the published times pin the bandwidth down."""
    ok = [float(c) for c in np.geomspace(1e-3, 1.0, 700)
          if np.max(np.abs(_fit_reciprocals(a, fixed, published, c)[1])) <= tolerance]
    return (min(ok), max(ok)) if ok else (math.nan, math.nan)


def _upstream_memory(w: Workload, vae_bytes_per_pixel: float) -> float:
    """Peak bytes per GPU of upstream Wan2.1 for a published point (rank 0, which also decodes).

    Sampling: the DiT (fp32 master weights, FSDP-sharded over P, or whole with offload while T5 and CLIP sit
    on the host) plus its activations; decoding: DiT, T5 (and CLIP) stay resident (no offload on P > 1), the
    VAE and its working memory are added; offload (P = 1) moves the DiT out before decoding.
    """
    p = w.sp
    dit = dit_weight_bytes(w.arch, w.dtype) / p
    encoders = 0 if w.offload else t5_weight_bytes() / p + (clip_weight_bytes() if w.task == "i2v" else 0)
    sampling = dit + encoders + dit_activation_bytes(w.arch, w.tokens, p)
    decode = (0 if w.offload else dit + encoders) + vae_weight_bytes() + vae_bytes_per_pixel * w.width * w.height
    return max(sampling, decode)


def _fit_rows(gpu: str, tasks: tuple[str, ...], cal: Calibration) -> tuple[FitRow, ...]:
    """Published vs projected seconds and peak memory for each published point of gpu and tasks."""
    rows = []
    for task in tasks:
        for p in WAN21_PUBLISHED[(gpu, task)]:
            w = upstream_workload(p.gpus, task)
            rows.append(FitRow(task, p.gpus, p.seconds, project_with(w, GPUS[gpu], cal).total_s, p.peak_gb,
                               _upstream_memory(w, cal.vae_bytes_per_pixel) / GB))
    return tuple(rows)


@functools.cache
def calibrate(gpu: str = "H100", tasks: tuple[str, ...] = ("t2v", "i2v")) -> Fit:
    """Fit (mfu, vae_eff, comm_eff) to Wan2.1's published 14B 720p seconds on `gpu` (T2V and I2V: 8 points),
    and the VAE decode memory per pixel to the published peak memory of the multi-GPU T2V points.

    Time: seconds = flops_s/mfu + vae_s/vae_eff + comm_s/comm_eff + fixed_s is linear in the reciprocals,
    so the fit is a linear least squares on the relative errors (rows divided by the published seconds),
    with every efficiency at most 1 (reciprocal >= 1). The 1-GPU points keep their offload explicitly:
    2 x (57.2 GB fp32 DiT + 11.4 GB T5) over PCIe per video, about 2 s of 1838 on H100.

    Why both tasks: the serial VAE work and the collectives both cost about the same at 2, 4 and 8 GPUs
    (FSDP + Ulysses bytes per rank barely change with P), so the T2V points alone cannot tell them apart
    (`calibrate(gpu, ("t2v",))` pins comm_eff at its bound of 1). I2V adds a serial VAE encode and a CLIP
    pass, which separates the two; vae_eff still absorbs any other per-video host-side work.

    Memory: the multi-GPU peaks are reached while rank 0 decodes with DiT and T5 shards resident
    (`_upstream_memory`); the one unknown, VAE working bytes per output pixel, is their least-squares fit.
    The 1-GPU peaks (sampling with the fp32 DiT) check `dit_activation_bytes` independently.
    """
    g = GPUS[gpu]
    workloads = [upstream_workload(p.gpus, t) for t in tasks for p in WAN21_PUBLISHED[(gpu, t)]]
    published = np.array([p.seconds for t in tasks for p in WAN21_PUBLISHED[(gpu, t)]])
    terms = [list(stage_terms(w, g).values()) for w in workloads]
    a = np.array([[sum(t.flops_s for t in ts), sum(t.vae_s for t in ts), sum(t.comm_s for t in ts)]
                  for ts in terms])
    fixed = np.array([sum(t.fixed_s for t in ts) for ts in terms])
    x, _ = _fit_reciprocals(a, fixed, published)

    decode_points = [(upstream_workload(p.gpus), p) for p in WAN21_PUBLISHED[(gpu, "t2v")] if p.gpus > 1]
    resident = np.array([dit_weight_bytes(w.arch, w.dtype) / w.sp + t5_weight_bytes() / w.sp + vae_weight_bytes()
                         for w, _ in decode_points])
    pixels = np.array([w.width * w.height for w, _ in decode_points])
    peak = np.array([p.peak_gb * GB for _, p in decode_points])
    per_pixel = float(np.sum(pixels * (peak - resident)) / np.sum(pixels * pixels))

    cal = Calibration(mfu=float(1 / x[0]), vae_eff=float(1 / x[1]), comm_eff=float(1 / x[2]),
                      vae_bytes_per_pixel=per_pixel,
                      source=f"least squares on Wan2.1's published {gpu} 14B 720p times ({', '.join(tasks)})")
    return Fit(cal, _fit_rows(gpu, tasks, cal), _comm_range(a, fixed, published, RANGE_TOLERANCE))


def calibration_for(gpu: str) -> Calibration:
    return calibrate(CALIBRATED_ON[gpu]).calibration


def held_out(gpu: str = "H100") -> tuple[FitRow, ...]:
    """Cross-check: fit the T2V points alone, then project the (unfitted) I2V points with that fit."""
    return _fit_rows(gpu, ("i2v",), calibrate(gpu, ("t2v",)).calibration)
