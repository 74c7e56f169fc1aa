"""Seconds per video: ideal times at vendor peaks, divided by efficiencies fitted to published timings.

Each stage's time is split by the efficiency that divides it, so that the calibration can fit the
efficiencies by linear least squares (capacity/calibration.py) and every projection reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass

from capacity.comm import cfg_gather_bytes_per_step, fsdp_bytes_per_forward, sp_bytes_per_forward
from capacity.flops import (
    clip_flops,
    dit_forward_flops,
    dit_quant_gemms,
    t5_flops,
    tiny_decode_flops,
    vae_decode_flops,
    vae_encode_flops,
)
from capacity.footprint import clip_weight_bytes, dit_param_counts, dit_weight_bytes, t5_weight_bytes
from capacity.hardware import GPU
from capacity.vae_split import VaeSplit, decode_split, encode_split
from capacity.workload import Workload

DEQUANT_BYTES_PER_WEIGHT = 7  # int8/fp8 -> bf16 dequantization traffic per weight per forward (model/quant.py)
# Scaled fp8 GEMMs (model/quant.py QuantLinear._scaled_mm, eager): per bf16 input element the row absmax reads
# 2 B, the fp32 quotient reads 2 and writes 4, the in-place clamp reads and writes 4 each, the cast reads 4
# and writes 1; per output element the bias add reads and writes 2 each. A fused kernel would move 2 + 2 + 1.
ACT_QUANT_BYTES_PER_INPUT = 21
BIAS_BYTES_PER_OUTPUT = 4


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

    flops_s: float  # DiT + T5 (+ CLIP) at the BF16 peak (fp8 compute: its GEMMs at the FP8 peak): / mfu
    vae_s: float  # VAE at the TF32 peak: divided by vae_eff
    comm_s: float  # collectives at link_bw, none overlapped with compute (ring: pessimistic): divided by comm_eff
    fixed_s: float  # offload over PCIe, int8/fp8 dequantization or activation quantization at HBM bw: as is


@dataclass(frozen=True)
class Fp8Compute:
    """One DiT forward on one rank with scaled fp8 GEMMs, at 100 % efficiency: the quantized linears' FLOPs
    move from the BF16 to the FP8 peak (divided by the same fitted MFU), attention and the unquantized
    linears stay bf16, and the dequantization traffic is replaced by the activations' quantization."""

    gemm_flops: float  # the quantized linears' FLOPs on this rank: per-token / sp + context
    bf16_s: float  # those FLOPs at the BF16 peak (what they cost without fp8 compute)
    fp8_s: float  # at the FP8 peak
    act_quant_s: float  # per-token activation quantization and the bias add, at HBM bandwidth (fixed)
    dequant_s: float  # the weight dequantization it replaces, at HBM bandwidth (fixed)


def fp8_compute_forward(w: Workload, gpu: GPU) -> Fp8Compute:
    """The fp8 compute terms of one forward of w on gpu; a ValueError for a GPU without fp8 tensor cores."""
    if gpu.fp8_flops is None:
        raise ValueError(f"{gpu.name} has no fp8 tensor cores: fp8 compute needs Ada or Hopper (H100, H200, "
                         f"L40S); without it its fp8 weights dequantize to bf16")
    g = dit_quant_gemms(w.arch, w.grid)
    flops = g.per_token / w.sp + g.context
    moved = ((g.per_token_inputs / w.sp + g.context_inputs) * ACT_QUANT_BYTES_PER_INPUT
             + (g.per_token_outputs / w.sp + g.context_outputs) * BIAS_BYTES_PER_OUTPUT)
    q_weights = dit_param_counts(w.arch)[1]
    return Fp8Compute(flops, flops / gpu.bf16_flops, flops / gpu.fp8_flops, moved / gpu.hbm_bw,
                      q_weights * DEQUANT_BYTES_PER_WEIGHT / gpu.hbm_bw)


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
    dit_flops_s = forwards * forward_flops / gpu.bf16_flops
    if w.fp8_compute:  # the quantized GEMMs at the FP8 peak; activation quantization instead of dequantization
        f8 = fp8_compute_forward(w, gpu)
        dit_flops_s += forwards * (f8.fp8_s - f8.bf16_s)
        dequant = f8.act_quant_s
    prompts = 2 if w.cfg else 1
    terms = {
        "text": Terms(prompts * t5_flops(arch.text_len) / gpu.bf16_flops, 0, 0, 0),
        "dit": Terms(dit_flops_s, 0, (forwards * comm + w.steps * step_comm) / gpu.link_bw, forwards * dequant),
        "vae": vae_decode_terms(w, gpu),
    }
    if w.task == "i2v":
        enc = vae_encode_terms(w, gpu)
        terms["image"] = Terms(clip_flops() / gpu.bf16_flops, enc.vae_s, enc.comm_s, 0)
    if w.offload:  # every video: DiT, T5 (and CLIP) host -> GPU before use, GPU -> host after
        moved = 2 * (dit_weight_bytes(arch, w.dtype) + t5_weight_bytes()
                     + (clip_weight_bytes() if w.task == "i2v" else 0))
        terms["offload"] = Terms(0, 0, 0, moved / gpu.host_bw)
    return terms


def decode_split_of(w: Workload) -> VaeSplit:
    """How w's decode is split: the Wan VAE over w.vae_ranks; the tiny decoder whole on rank 0."""
    return decode_split(w.grid, w.vae_ranks if w.decoder == "full" else 1)


def encode_split_of(w: Workload) -> VaeSplit:
    """How w's I2V encode (the Wan VAE encoder, whichever decoder) is split: over w.vae_ranks."""
    return encode_split(w.frames, w.height, w.width, w.grid[1], w.vae_ranks)


def vae_decode_terms(w: Workload, gpu: GPU) -> Terms:
    """The decode: its FLOPs at the TF32 peak (/ vae_eff); split, the largest band's share of the convolutions
    plus the whole mid-block attention, and the halo, attention all-gather and pixel gather at link_bw
    (/ comm_eff). The tiny decoder: its FLOPs at the same peak and efficiency (uncalibrated), on rank 0."""
    if w.decoder == "tiny":
        return Terms(0, tiny_decode_flops(w.grid) / gpu.tf32_flops, 0, 0)
    flops, split = vae_decode_flops(w.grid), decode_split_of(w)
    if split.ranks == 1:
        return Terms(0, flops / gpu.tf32_flops, 0, 0)
    return Terms(0, split.compute_flops(flops) / gpu.tf32_flops, split.comm_bytes / gpu.link_bw, 0)


def vae_encode_terms(w: Workload, gpu: GPU) -> Terms:
    """The I2V encode, split as the decode (its latent all-gathered to every rank instead of gathered)."""
    flops, split = vae_encode_flops(w.frames, w.height, w.width), encode_split_of(w)
    if split.ranks == 1:
        return Terms(0, flops / gpu.tf32_flops, 0, 0)
    return Terms(0, split.compute_flops(flops) / gpu.tf32_flops, split.comm_bytes / gpu.link_bw, 0)


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
