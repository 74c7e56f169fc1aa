"""Capacity planner for Wan2.1 on GPU clusters: FLOPs, bytes moved, memory, seconds per video, replicas.

Why: users size a RayService (GPUs per replica, replicas for a target rate, CausVid sessions per GPU)
before they have the GPUs. Pure arithmetic plus meta-device counting of wanserve's own modules, calibrated
to Wan2.1's published timings: no Ray, no GPU. The model, its terms and assumptions: capacity/README.md.

Layers, bottom up: hardware, workload -> flops -> vae_split, footprint -> comm -> timing -> calibration ->
plan -> report (what `benchmarks/capacity.py` prints). The names below are the planner's public API.
"""
from capacity.calibration import (
    CALIBRATED_ON,
    RANGE_TOLERANCE,
    WAN21_PUBLISHED,
    Fit,
    FitRow,
    Published,
    calibrate,
    calibration_for,
    held_out,
    upstream_workload,
)
from capacity.comm import SPBytes, cfg_gather_bytes_per_step, fsdp_bytes_per_forward, sp_bytes_per_forward
from capacity.flops import (
    DiTFlops,
    QuantGemms,
    clip_flops,
    count_dit_forward,
    count_quant_gemms,
    count_vae_decode,
    count_vae_encode,
    dit_forward_flops,
    dit_quant_gemms,
    t5_flops,
    tiny_decode_flops,
    vae_decode_flops,
    vae_encode_flops,
)
from capacity.footprint import (
    RESERVED_BYTES,
    STREAM_DECODER_BYTES_PER_PIXEL,
    causvid_cache_bytes,
    clip_weight_bytes,
    cross_cache_bytes,
    dit_activation_bytes,
    dit_param_counts,
    dit_weight_bytes,
    stream_decoder_bytes,
    t5_weight_bytes,
    vae_weight_bytes,
)
from capacity.hardware import GB, GIB, GPU, GPUS, TERA
from capacity.plan import Memory, memory, project, replicas_for
from capacity.timing import (
    ACT_QUANT_BYTES_PER_INPUT,
    BIAS_BYTES_PER_OUTPUT,
    DEQUANT_BYTES_PER_WEIGHT,
    Calibration,
    Fp8Compute,
    Projection,
    Terms,
    decode_split_of,
    encode_split_of,
    fp8_compute_forward,
    vae_decode_terms,
    vae_encode_terms,
)
from capacity.vae_split import (
    VAE_BYTES,
    VaeSplit,
    VaeTraffic,
    count_vae_traffic,
    decode_split,
    decode_traffic,
    encode_split,
    encode_traffic,
    max_band,
    row_bands,
    video_bytes,
)
from capacity.workload import COMPUTE_BYTES, DECODERS, DTYPES, MODELS, Workload, shard_tokens

__all__ = [
    "ACT_QUANT_BYTES_PER_INPUT", "BIAS_BYTES_PER_OUTPUT", "CALIBRATED_ON", "COMPUTE_BYTES", "DECODERS",
    "DEQUANT_BYTES_PER_WEIGHT", "DTYPES", "GB", "GIB", "GPU", "GPUS", "MODELS", "RANGE_TOLERANCE",
    "RESERVED_BYTES", "STREAM_DECODER_BYTES_PER_PIXEL", "TERA", "VAE_BYTES", "WAN21_PUBLISHED",
    "Calibration", "DiTFlops", "Fit", "FitRow", "Fp8Compute", "Memory", "Projection", "Published",
    "QuantGemms", "SPBytes", "Terms", "VaeSplit", "VaeTraffic", "Workload",
    "calibrate", "calibration_for", "causvid_cache_bytes", "cfg_gather_bytes_per_step", "clip_flops",
    "clip_weight_bytes", "count_dit_forward", "count_quant_gemms", "count_vae_decode", "count_vae_encode",
    "count_vae_traffic", "cross_cache_bytes", "decode_split", "decode_split_of", "decode_traffic",
    "dit_activation_bytes", "dit_forward_flops", "dit_param_counts", "dit_quant_gemms", "dit_weight_bytes",
    "encode_split", "encode_split_of", "encode_traffic", "fp8_compute_forward", "fsdp_bytes_per_forward",
    "held_out", "max_band", "memory", "project", "replicas_for", "row_bands", "shard_tokens",
    "sp_bytes_per_forward", "stream_decoder_bytes", "t5_flops", "t5_weight_bytes", "tiny_decode_flops",
    "upstream_workload", "vae_decode_flops", "vae_decode_terms", "vae_encode_flops", "vae_encode_terms",
    "vae_weight_bytes", "video_bytes",
]
