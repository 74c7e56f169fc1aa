"""Seconds per video: ideal times at vendor peaks, divided by efficiencies fitted to published timings.

Each stage's time is split by the efficiency that divides it, so that the calibration can fit the
efficiencies by linear least squares (capacity/calibration.py) and every projection reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass

from capacity.comm import cfg_gather_bytes_per_step, fsdp_bytes_per_forward, sp_bytes_per_forward
from capacity.flops import clip_flops, dit_forward_flops, t5_flops, vae_decode_flops, vae_encode_flops
from capacity.footprint import clip_weight_bytes, dit_param_counts, dit_weight_bytes, t5_weight_bytes
from capacity.hardware import GPU
from capacity.workload import Workload

DEQUANT_BYTES_PER_WEIGHT = 7  # int8/fp8 -> bf16 dequantization traffic per weight per forward (model/quant.py)


@dataclass(frozen=True)
class Calibration:
    mfu: float  # DiT and T5 FLOP/s achieved / dense BF16 peak
    vae_eff: float  # VAE decode/encode FLOP/s achieved / dense TF32 peak
    comm_eff: float  # effective collective bandwidth / link_bw (SP all-to-all and ring, FSDP, CFG gathers)
    vae_bytes_per_pixel: float  # VAE decode working memory per output pixel (fitted to published peaks)
    source: str = ""


@dataclass(frozen=True)
class Terms:
    """Seconds of one video at 100 % efficiency, grouped by the efficiency that divides them."""

    flops_s: float  # DiT + T5 (+ CLIP) at the BF16 peak: divided by mfu
    vae_s: float  # VAE at the TF32 peak: divided by vae_eff
    comm_s: float  # collectives at link_bw, none overlapped with compute (ring: pessimistic): divided by comm_eff
    fixed_s: float  # offload over PCIe and int8/fp8 dequantization at HBM bandwidth: taken as is


def stage_terms(w: Workload, gpu: GPU) -> dict[str, Terms]:
    """Per stage (text, image, dit, vae, offload): the ideal-time terms on `gpu`."""
    arch = w.arch
    dit = dit_forward_flops(arch, w.grid)
    forwards = w.steps * w.forwards_per_step
    forward_flops = dit.per_token / w.sp + dit.context
    sp = sp_bytes_per_forward(arch, w.tokens, w.ulysses, w.ring)
    comm = sp.total + (fsdp_bytes_per_forward(arch, w.dtype, w.sp) if w.fsdp else 0)
    step_comm = cfg_gather_bytes_per_step(w.grid, arch.out_dim) if w.cfg_parallel == 2 else 0
    _, q_weights, _ = dit_param_counts(arch)
    dequant = q_weights * DEQUANT_BYTES_PER_WEIGHT / gpu.hbm_bw if w.dtype in ("int8", "fp8") else 0.0
    prompts = 2 if w.cfg else 1
    terms = {
        "text": Terms(prompts * t5_flops(arch.text_len) / gpu.bf16_flops, 0, 0, 0),
        "dit": Terms(forwards * forward_flops / gpu.bf16_flops, 0,
                     (forwards * comm + w.steps * step_comm) / gpu.link_bw, forwards * dequant),
        "vae": Terms(0, vae_decode_flops(w.grid) / gpu.tf32_flops, 0, 0),
    }
    if w.task == "i2v":
        terms["image"] = Terms(clip_flops() / gpu.bf16_flops,
                               vae_encode_flops(w.frames, w.height, w.width) / gpu.tf32_flops, 0, 0)
    if w.offload:  # every video: DiT, T5 (and CLIP) host -> GPU before use, GPU -> host after
        moved = 2 * (dit_weight_bytes(arch, w.dtype) + t5_weight_bytes()
                     + (clip_weight_bytes() if w.task == "i2v" else 0))
        terms["offload"] = Terms(0, 0, 0, moved / gpu.host_bw)
    return terms


def _seconds(t: Terms, cal: Calibration) -> float:
    return t.flops_s / cal.mfu + t.vae_s / cal.vae_eff + t.comm_s / cal.comm_eff + t.fixed_s


@dataclass(frozen=True)
class Projection:
    gpu: str
    gpus: int
    stages: dict[str, float]  # seconds per stage: text, image (I2V), dit, vae, offload
    dit_compute_s: float
    dit_comm_s: float

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    @property
    def dit_s(self) -> float:
        return self.stages["dit"]

    @property
    def videos_per_minute(self) -> float:
        """Per replica, one video after the other (stages are not overlapped across requests)."""
        return 60.0 / self.total_s


def project_with(w: Workload, gpu: GPU, cal: Calibration) -> Projection:
    """Seconds per video of workload w on gpu with the efficiencies of `cal`."""
    terms = stage_terms(w, gpu)
    dit = terms["dit"]
    return Projection(gpu.name, w.gpus, {k: _seconds(t, cal) for k, t in terms.items()},
                      dit.flops_s / cal.mfu + dit.fixed_s, dit.comm_s / cal.comm_eff)
