"""FLOPs of what wanserve runs, counted by torch's FlopCounterMode on the meta device.

Counting the real modules (shapes only, no weights) keeps the numbers tied to the code instead of to a
hand-written formula; on meta, SDPA takes its math path (two counted `aten.bmm`), while on CPU it would
dispatch to a kernel with no FLOP formula and count 0. Identical blocks and frames are counted once or twice
and extrapolated (tested equal to direct counts). See capacity/README.md.
"""
from __future__ import annotations

import functools
import re
from dataclasses import astuple, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.archs import ClipArch, DiTArch, T5Arch, VaeArch
from model.dit import WanModel


def _count(module_factory, run) -> dict[str, dict]:
    """FlopCounterMode's per-module counts of run(module), all on the meta device."""
    with torch.device("meta"):
        module = module_factory()
        with FlopCounterMode(display=False) as counter:
            run(module)
    return counter.get_flop_counts()


def _op(counts: dict, module: str, op: str) -> int:
    return sum(v for k, v in counts.get(module, {}).items() if str(k) == op)


@dataclass(frozen=True)
class DiTFlops:
    """FLOPs of one DiT forward (batch 1), split by what scales with the video tokens."""

    self_attention: int  # SDPA of video tokens over video tokens: QK^T and AV
    cross_attention: int  # SDPA of video tokens over the context (text, + CLIP image tokens for I2V)
    token_linear: int  # every linear / conv applied per video token (q k v o, cross q o, FFN, patch, head)
    context: int  # text/time/image embeddings and the cross-attention K/V of the context: not per token

    @property
    def attention(self) -> int:
        return self.self_attention + self.cross_attention

    @property
    def total(self) -> int:
        return self.self_attention + self.cross_attention + self.token_linear + self.context

    @property
    def per_token(self) -> int:
        """Everything sharded by sequence parallelism (the context part is recomputed on every rank)."""
        return self.total - self.context


@functools.cache
def meta_dit(arch: DiTArch):
    """WanModel(arch) in bf16 on the meta device (built once per architecture: shapes only)."""
    with torch.device("meta"):
        return WanModel(arch).to(torch.bfloat16).eval()


_CONTEXT_MODULES = re.compile(r"^WanModel\.(text_embedding|time_embedding|time_projection|img_emb"
                              r"|blocks\.\d+\.cross_attn\.(k|v|k_img|v_img))$")


def dit_forward_flops(arch: DiTArch, grid: tuple[int, int, int]) -> DiTFlops:
    """FLOPs of `WanModel(arch)` on one latent of `grid` = (frames, h, w), batch 1.

    The blocks are identical, so the model is counted with 1 and with 2 blocks and every part extrapolated
    linearly to num_layers: F(n) = F(1) + (n-1)·(F(2) - F(1)). Exact (tested against a full count) and
    ~15x faster than counting 40 blocks.
    """
    if arch.num_layers <= 2:
        return count_dit_forward(arch, grid)
    one = astuple(count_dit_forward(arch.model_copy(update={"num_layers": 1}), grid))
    two = astuple(count_dit_forward(arch.model_copy(update={"num_layers": 2}), grid))
    return DiTFlops(*(a + (arch.num_layers - 1) * (b - a) for a, b in zip(one, two)))


@functools.cache
def _dit_counts(arch: DiTArch, grid: tuple[int, int, int]) -> dict[str, dict]:
    """The counter's per-module FLOPs of one WanModel(arch) forward (batch 1) on one latent of grid."""
    f, h, w = grid

    def run(model):
        kw = dict(x=torch.empty(1, arch.out_dim, f, h, w), t=torch.empty(1),
                  context=torch.empty(1, arch.text_len, arch.text_dim))
        if arch.is_i2v:
            kw.update(clip_fea=torch.empty(1, ClipArch().num_tokens, arch.img_dim),
                      y=torch.empty(1, arch.in_dim - arch.out_dim, f, h, w))
        model(**kw)

    return _count(lambda: meta_dit(arch), run)


@functools.cache
def count_dit_forward(arch: DiTArch, grid: tuple[int, int, int]) -> DiTFlops:
    """FLOPs of one `WanModel(arch)` forward on one latent of `grid`, every block counted on meta.

    Attention = the `aten.bmm` FLOPs (SDPA's math path on meta) under each block's `self_attn` / `cross_attn`;
    context = the modules that only see the context (the cross-attention `k`/`v` linears run in
    `context_kv`, outside their block's forward); token_linear = the rest.
    """
    counts = _dit_counts(arch, grid)
    total = sum(counts["Global"].values())
    blocks = [f"WanModel.blocks.{i}" for i in range(arch.num_layers)]
    self_attn = sum(_op(counts, b + ".self_attn", "aten.bmm") for b in blocks)
    cross_attn = sum(_op(counts, b + ".cross_attn", "aten.bmm") for b in blocks)
    if self_attn == 0 or self_attn + cross_attn != _op(counts, "Global", "aten.bmm"):
        raise RuntimeError("SDPA was not counted as the DiT's only bmm calls; has its meta dispatch changed?")
    context = sum(sum(v.values()) for k, v in counts.items() if _CONTEXT_MODULES.match(k))
    return DiTFlops(self_attn, cross_attn, total - self_attn - cross_attn - context, context)


@dataclass(frozen=True)
class QuantGemms:
    """The GEMMs of the quantized linears (model/quant.py: blocks.N.{self_attn, cross_attn, ffn}) in one DiT
    forward (batch 1): what fp8 compute moves to fp8 tensor cores, and the elements its per-token activation
    quantization reads (inputs, M·K) and its bias add writes (outputs, M·N)."""

    per_token: int  # FLOPs on the video tokens (sharded by SP): self q k v o, cross q o, FFN
    context: int  # FLOPs on the context, on every rank: cross-attention k, v (+ k_img, v_img)
    per_token_inputs: int
    context_inputs: int
    per_token_outputs: int
    context_outputs: int


_QUANTIZED_LINEAR = re.compile(r"^WanModel\.(blocks\.\d+\.(self_attn|cross_attn|ffn)\.[^.]+)$")


@functools.cache
def count_quant_gemms(arch: DiTArch, grid: tuple[int, int, int]) -> QuantGemms:
    """QuantGemms of `WanModel(arch)` on grid, every block counted: each quantized linear's FLOPs 2·M·K·N from
    the counter, its M·K and M·N from its shape."""
    model, parts = meta_dit(arch), [0] * 6
    for key, ops in _dit_counts(arch, grid).items():
        match = _QUANTIZED_LINEAR.match(key)
        layer = model.get_submodule(match.group(1)) if match else None
        if not isinstance(layer, nn.Linear):
            continue
        flops, ctx = sum(ops.values()), int(bool(_CONTEXT_MODULES.match(key)))
        parts[ctx] += flops
        parts[2 + ctx] += flops // (2 * layer.out_features)
        parts[4 + ctx] += flops // (2 * layer.in_features)
    return QuantGemms(*parts)


def dit_quant_gemms(arch: DiTArch, grid: tuple[int, int, int]) -> QuantGemms:
    """count_quant_gemms, counted with 1 and 2 blocks and extrapolated as dit_forward_flops is."""
    if arch.num_layers <= 2:
        return count_quant_gemms(arch, grid)
    one = astuple(count_quant_gemms(arch.model_copy(update={"num_layers": 1}), grid))
    two = astuple(count_quant_gemms(arch.model_copy(update={"num_layers": 2}), grid))
    return QuantGemms(*(a + (arch.num_layers - 1) * (b - a) for a, b in zip(one, two)))


@functools.cache
def t5_flops(text_len: int = 512, arch: T5Arch = T5Arch()) -> int:
    """umT5-XXL encoder over one prompt padded to text_len tokens (transformers' UMT5EncoderModel on meta).

    No attention mask is passed: transformers' mask helper calls `.all()` on it, which meta tensors cannot
    answer, and a key mask changes no FLOPs.
    """
    from transformers import UMT5EncoderModel

    from model.encoders import t5_config

    counts = _count(lambda: UMT5EncoderModel(t5_config(arch)),
                    lambda m: m(input_ids=torch.zeros(1, text_len, dtype=torch.long)))
    return sum(counts["Global"].values())


@functools.cache
def clip_flops(arch: ClipArch = ClipArch()) -> int:
    """The I2V image encoder (CLIP ViT-H/14 tower, one 224x224 image)."""
    from transformers import CLIPVisionModel

    from model.encoders import clip_config

    counts = _count(lambda: CLIPVisionModel(clip_config(arch)),
                    lambda m: m(pixel_values=torch.empty(1, 3, arch.image_size, arch.image_size)))
    return sum(counts["Global"].values())


def vae_module():
    """diffusers' AutoencoderKLWan at the release widths (VaeArch defaults), on the current device."""
    from diffusers import AutoencoderKLWan

    from model.vae import vae_config

    return AutoencoderKLWan(**vae_config(VaeArch()))


@functools.cache
def count_vae_decode(grid: tuple[int, int, int]) -> int:
    """Wan VAE decode of one latent (frames, h, w), counted frame by frame on meta: diffusers' chunked
    causal path, as model/vae.py runs it."""
    f, h, w = grid
    counts = _count(vae_module, lambda m: m.decode(torch.empty(1, VaeArch().z_dim, f, h, w)))
    return sum(counts["Global"].values())


@functools.cache
def count_vae_encode(frames: int, height: int, width: int) -> int:
    """Wan VAE encode of one RGB video, counted on meta (first frame, then 4-frame chunks)."""
    counts = _count(vae_module, lambda m: m.encode(torch.empty(1, 3, frames, height, width)))
    return sum(counts["Global"].values())


def vae_decode_flops(grid: tuple[int, int, int]) -> int:
    """VAE decode FLOPs. The decoder runs one latent frame per call with a causal cache; from the second
    frame on every call has the same shapes, so F frames cost count(2) + (F-2)·(count(3) - count(2)):
    counting 3 frames instead of 21 (tested equal to a direct count)."""
    f, h, w = grid
    if f <= 3:
        return count_vae_decode(grid)
    c2, c3 = count_vae_decode((2, h, w)), count_vae_decode((3, h, w))
    return c2 + (f - 2) * (c3 - c2)


def vae_encode_flops(frames: int, height: int, width: int) -> int:
    """VAE encode FLOPs (I2V encodes the first frame followed by frames-1 zero frames). One frame, then
    identical 4-frame chunks: 1+4k frames cost count(5) + (k-1)·(count(9) - count(5))."""
    k = (frames - 1) // 4
    if k <= 2:
        return count_vae_encode(frames, height, width)
    c5, c9 = count_vae_encode(5, height, width), count_vae_encode(9, height, width)
    return c5 + (k - 1) * (c9 - c5)



@functools.cache
def tiny_decode_flops(grid: tuple[int, int, int]) -> int:
    """The tiny decoder (`use_tae`: model/tae.py's TAEHV at the taew2_1 release widths, decoder only) on one
    latent (frames, h, w), counted on meta: all frames at once, as `TinyDecoder.decode` runs it (its leading
    trimmed frames dropped as early as `run_blocks` drops them)."""
    from model.tae import TAEHV

    f, h, w = grid
    counts = _count(lambda: TAEHV(VaeArch().z_dim, encoder=False),
                    lambda m: m.decode_frames(torch.empty(1, f, VaeArch().z_dim, h, w)))
    return sum(counts["Global"].values())
