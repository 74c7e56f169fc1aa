"""Bytes a GPU holds for wanserve: weights, one forward's activations, a CausVid session's caches.

Parameter counts come from the real modules built on the meta device; activations follow a stated walk of
`model/dit.py` (checked against Wan2.1's published single-GPU peaks by the calibration); the streaming
VAE decoder's state is a measured per-pixel constant (tests/test_capacity.py measures it again).
"""
from __future__ import annotations

import functools
import re

import torch

from capacity.flops import meta_dit, vae_module
from capacity.hardware import GB
from capacity.workload import COMPUTE_BYTES, shard_tokens
from model.archs import ClipArch, DiTArch, T5Arch

RESERVED_BYTES = 3 * GB  # CUDA context, cuBLAS/NCCL workspaces and allocator slack, kept free on every GPU

_QUANTIZED = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn|ffn)\.")


@functools.cache
def dit_param_counts(arch: DiTArch) -> tuple[int, int, int]:
    """(all parameters, weights of the quantized linears, their output channels) of WanModel(arch).

    The quantized linears are those model/quant.py (and LightX2V) store in 8 bits: every 2-D weight under
    blocks.N.{self_attn, cross_attn, ffn}.
    """
    total = q_weights = q_rows = 0
    for name, p in meta_dit(arch).named_parameters():
        total += p.numel()
        if _QUANTIZED.match(name) and p.dim() == 2:
            q_weights += p.numel()
            q_rows += p.shape[0]
    return total, q_weights, q_rows


def dit_weight_bytes(arch: DiTArch, dtype: str) -> int:
    """DiT weights: fp32 4 B, bf16 2 B per parameter; int8/fp8: the block linears at 1 B per weight plus
    one fp32 scale per output channel, everything else (embeddings, head, norms, biases) in bf16."""
    total, q_weights, q_rows = dit_param_counts(arch)
    if dtype == "fp32":
        return 4 * total
    if dtype == "bf16":
        return 2 * total
    return q_weights + 4 * q_rows + 2 * (total - q_weights)


@functools.cache
def _module_params(name: str) -> int:
    """Parameter count of "t5", "clip" or "vae", built on meta."""
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from model.encoders import clip_config, t5_config

    with torch.device("meta"):
        if name == "t5":
            module = UMT5EncoderModel(t5_config(T5Arch()))
        elif name == "clip":
            module = CLIPVisionModel(clip_config(ClipArch()))
        else:
            module = vae_module()
    # UMT5's token embedding is tied (shared == encoder.embed_tokens): parameters() yields it once
    return sum(p.numel() for p in module.parameters())


def t5_weight_bytes() -> int:
    """umT5-XXL encoder in bf16 (wanserve loads it in the DiT's compute dtype; upstream's file is bf16)."""
    return 2 * _module_params("t5")


def clip_weight_bytes() -> int:
    """The I2V CLIP image tower in 16 bits (upstream: fp16; wanserve: the DiT's compute dtype)."""
    return 2 * _module_params("clip")


def vae_weight_bytes() -> int:
    """The Wan VAE in fp32 (model/pipeline.py and upstream both run it in float32)."""
    return 4 * _module_params("vae")


def dit_activation_bytes(arch: DiTArch, tokens: int, sp: int = 1, fp8_compute: bool = False) -> int:
    """Peak activation memory of one DiT forward (batch 1, inference) on one rank, in bytes.

    Walks `model/dit.py` Block.forward with an fp32 residual stream and bf16 linears/attention; per local
    token (s = ceil(tokens/sp)), the larger of the two phases of a block:

    * self-attention: the residual x (fp32, 4·dim) and its modulated norm (fp32, 4·dim), q, k, v (bf16,
      6·dim), the rotated q (bf16, 2·dim) and, while k is rotated, RoPE's float64 copy and float64 complex
      product (8·dim + 8·dim): 32·dim bytes. (Flash/SDPA attention itself keeps O(s) extra, ignored; the
      all-to-all buffers, 12·dim, come after the float64 transients are freed.)
    * FFN: x and its modulated norm (8·dim), its bf16 cast (2·dim), the hidden and GELU outputs
      (bf16, 2·ffn_dim each): 10·dim + 4·ffn_dim bytes; with fp8 compute (scaled fp8 GEMMs) also the
      quantization of the second FFN linear's input, its fp32 quotient and fp8 codes: + 5·ffn_dim.

    Plus, held for the whole forward: the cross-attention K/V of every block (layers · 2 · context · dim · 2 B,
    context = text_len, + 257 CLIP tokens for I2V) and the RoPE table (complex128, 8·head_dim B per local
    token); with sp > 1 also the full patchified sequence and RoPE table every rank builds before sharding
    (tokens · (4·dim + 8·head_dim)).
    """
    dim, ffn, hd = arch.dim, arch.ffn_dim, arch.head_dim
    s = shard_tokens(tokens, sp)
    per_token = max(32 * dim, 10 * dim + (9 if fp8_compute else 4) * ffn)
    context = arch.text_len + (ClipArch().num_tokens if arch.is_i2v else 0)
    held = arch.num_layers * 2 * context * dim * COMPUTE_BYTES + 8 * hd * s
    unsharded = tokens * (4 * dim + 8 * hd) if sp > 1 else 0
    return s * per_token + held + unsharded


def causvid_cache_bytes(arch: DiTArch, frame_tokens: int, window_frames: int,
                        dtype_bytes: int = COMPUTE_BYTES) -> int:
    """Self-attention KV cache of one CausVid session: tokens x layers x 2 (K and V) x dim x bytes.

    tokens = window_frames x frame_tokens (the rolling cache holds the last `window_frames` latent frames,
    the block being generated included, as Self-Forcing's kv_cache_size = local_attn_size x 1560).
    """
    return window_frames * frame_tokens * arch.num_layers * 2 * arch.dim * dtype_bytes


# The streaming VAE decoder of a CausVid session keeps every causal conv's last input frames (fp32) between
# blocks: 9,458 bytes per output pixel for the Wan2.1 VAE (measured: the decoder feature cache of
# model/vae.py's StreamDecoder, i.e. diffusers AutoencoderKLWan's, after >= 2 latent frames, exactly linear
# in pixels; 3.52 GiB at 832x480; tests/test_capacity.py measures it on meta). Held on rank 0 only.
STREAM_DECODER_BYTES_PER_PIXEL = 9458


def stream_decoder_bytes(width: int, height: int) -> int:
    return STREAM_DECODER_BYTES_PER_PIXEL * width * height


def cross_cache_bytes(arch: DiTArch, dtype_bytes: int = COMPUTE_BYTES) -> int:
    """Cross-attention K/V of one session's prompt (+ image), computed once and kept: layers x 2 x ctx x dim."""
    context = arch.text_len + (ClipArch().num_tokens if arch.is_i2v else 0)
    return arch.num_layers * 2 * context * arch.dim * dtype_bytes
