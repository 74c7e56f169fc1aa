"""Capacity model for Wan2.1 on GPU clusters: FLOPs, bytes moved, memory, seconds per video, replicas.

Why: users size their RayService (GPUs per replica, replicas for a target rate, whether a CausVid session's KV
cache fits next to the weights) before they have the GPUs, and no GPU is reachable where wanserve is developed.
So the answer is a model of wanserve's own computation, built from three parts that are checked separately:

1. What the code computes. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` running the real
   modules on the meta device (shapes only: no weights, no arithmetic): `model.dit.WanModel`, transformers'
   `UMT5EncoderModel` / `CLIPVisionModel` and diffusers' `AutoencoderKLWan` as `model/encoders.py` and
   `model/vae.py` configure them. On meta, `F.scaled_dot_product_attention` takes its math path, QK^T and AV as
   two `aten.bmm`, which the counter does count (4·B·H·Lq·Lk·D per call). On CPU tensors it would dispatch to
   `_scaled_dot_product_flash_attention_for_cpu`, which has no FLOP formula in torch 2.13 and counts 0: one
   more reason to count on meta. The DiT's only `bmm` calls are its attentions (checked on every count).
2. What sequence parallelism moves. Bytes sent per rank per forward follow from the collective pattern
   (Ulysses all-to-all of q/k/v and back, ring passing of K/V blocks, final all-gather) in closed form
   (`sp_bytes_per_forward`), so that a CPU/gloo run of `parallel/` can be instrumented against them.
3. What a GPU achieves. Vendor peak FLOP/s and bandwidths (`GPUS`) times three efficiencies fitted by least
   squares to Wan2.1's published 14B 720p timings on that GPU generation (`calibrate`): the fraction of
   peak the DiT reaches (MFU), the fraction the fp32 VAE reaches, and the effective collective bandwidth.
   Memory per GPU (`memory`) adds weights, a stated activation formula and the VAE's working memory
   (fitted to the published peaks), and says how many CausVid KV caches fit beside them.

Pure arithmetic plus meta-device counting: no Ray, no HTTP, no GPU. Counting a 14B forward takes well under
a second (two blocks are counted, the rest extrapolated); results are cached per shape.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import asdict, astuple, dataclass, replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import (
    VAE_SPACE_STRIDE,
    WAN21_I2V_14B,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    ClipArch,
    DiTArch,
    T5Arch,
    VaeArch,
    latent_frames,
)
from model.dit import WanModel

GB = 1e9
GIB = 2 ** 30
TERA = 1e12

MODELS: dict[tuple[str, str], DiTArch] = {
    ("t2v", "1.3B"): WAN21_T2V_1_3B,
    ("t2v", "14B"): WAN21_T2V_14B,
    ("i2v", "14B"): WAN21_I2V_14B,
}
DTYPES = ("fp32", "bf16", "int8", "fp8")  # DiT weight storage; fp32 = upstream Wan's master weights
COMPUTE_BYTES = 2  # activations, q/k/v and collectives run in bf16 on GPU (model/loader.default_dtype)
DEQUANT_BYTES_PER_WEIGHT = 7  # int8/fp8 -> bf16 dequantization traffic per weight per forward (model/quant.py)
RESERVED_BYTES = 3 * GB  # CUDA context, cuBLAS/NCCL workspaces and allocator slack, kept free on every GPU


# --------------------------------------------------------------------------------------------------
# GPUs: vendor figures (dense, i.e. without 2:4 sparsity; bandwidths per direction)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s: the DiT and T5
    tf32_flops: float  # dense TF32 peak, FLOP/s: the fp32 VAE's convolutions (cuDNN allows TF32 by default)
    memory_bytes: float  # HBM / GDDR capacity
    hbm_bw: float  # memory bandwidth, bytes/s
    link_bw: float  # GPU<->GPU, bytes/s per direction: NVLink, or PCIe peer-to-peer where there is none
    host_bw: float  # host<->GPU PCIe, bytes/s per direction (model offload)


GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 1,979 TFLOPS and TF32 989 TFLOPS "with sparsity"
    # (dense = half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions), PCIe Gen5 128 GB/s (both).
    "H100": GPU("H100 SXM5 80GB", 989.4 * TERA, 494.7 * TERA, 80 * GB, 3.35e12, 450 * GB, 64 * GB),
    # NVIDIA H200 datasheet, SXM column: same tensor cores as H100 (BF16 1,979 / TF32 989 TFLOPS sparse),
    # 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
    "H200": GPU("H200 SXM 141GB", 989.4 * TERA, 494.7 * TERA, 141 * GB, 4.8e12, 450 * GB, 64 * GB),
    # NVIDIA A100 datasheet, 80GB SXM column: BF16 312 TFLOPS and TF32 156 TFLOPS dense, HBM2e 2,039 GB/s,
    # NVLink 600 GB/s, PCIe Gen4 64 GB/s.
    "A100": GPU("A100 SXM 80GB", 312 * TERA, 156 * TERA, 80 * GB, 2.039e12, 300 * GB, 32 * GB),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS and TF32 183 TFLOPS dense (733 / 366 with sparsity), 48 GB GDDR6
    # at 864 GB/s, no NVLink: PCIe Gen4 x16 64 GB/s (both directions) for GPU<->GPU and host traffic alike.
    "L40S": GPU("L40S 48GB", 362.05 * TERA, 183 * TERA, 48 * GB, 864 * GB, 32 * GB, 32 * GB),
}


# --------------------------------------------------------------------------------------------------
# A workload: one video request and how it is laid out on GPUs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One generation: model, size, sampler and parallel layout (`gpus` = ulysses · ring · cfg_parallel)."""

    model: str = "14B"  # "1.3B" | "14B"
    task: str = "t2v"  # "t2v" | "i2v"
    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 50
    cfg: bool = True  # two DiT forwards per step (cond + uncond), run one after the other
    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1  # 2: cond and uncond on two SP groups, one latent all-gather per step
    dtype: str = "bf16"  # DiT weights; int8/fp8 are weight-only (compute stays bf16, model/quant.py)
    fsdp: bool = False  # DiT (and T5) weights sharded over the SP group, gathered per forward
    offload: bool = False  # upstream --offload_model: DiT and T5 copied host->GPU->host for every video
    t5_on_gpu: bool = True
    causvid_window: int | None = None  # latent frames in a CausVid KV cache (None: the whole video)
    causvid_block_frames: int = 3  # latent frames generated per CausVid forward

    def __post_init__(self):
        if (self.task, self.model) not in MODELS:
            raise ValueError(f"no Wan2.1 {self.task} {self.model} model; choose from {sorted(MODELS)}")
        if self.width % 16 or self.height % 16:
            raise ValueError(f"size {self.width}x{self.height}: width and height must be multiples of 16")
        if (self.frames - 1) % 4:
            raise ValueError(f"frames = {self.frames}: must be 4n+1 (the VAE compresses time by 4)")
        if self.arch.num_heads % self.ulysses:
            raise ValueError(f"ulysses = {self.ulysses} must divide num_heads = {self.arch.num_heads}")
        if self.cfg_parallel not in (1, 2) or (self.cfg_parallel == 2 and not self.cfg):
            raise ValueError("cfg_parallel is 1, or 2 with CFG on")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}: choose from {DTYPES}")
        if min(self.ulysses, self.ring, self.steps, self.causvid_block_frames) < 1:
            raise ValueError("ulysses, ring, steps and causvid_block_frames must be >= 1")

    @property
    def arch(self) -> DiTArch:
        return MODELS[(self.task, self.model)]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent (frames, height, width)."""
        return latent_frames(self.frames), self.height // VAE_SPACE_STRIDE, self.width // VAE_SPACE_STRIDE

    @property
    def tokens(self) -> int:
        return self.arch.num_tokens(*self.grid)

    @property
    def frame_tokens(self) -> int:
        return self.arch.num_tokens(1, *self.grid[1:])

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def gpus(self) -> int:
        return self.sp * self.cfg_parallel

    @property
    def forwards_per_step(self) -> int:
        """DiT forwards one SP group runs per sampler step."""
        return 2 if self.cfg and self.cfg_parallel == 1 else 1


# --------------------------------------------------------------------------------------------------
# FLOPs, counted on the meta device
# --------------------------------------------------------------------------------------------------
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
def _meta_dit(arch: DiTArch):
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
def count_dit_forward(arch: DiTArch, grid: tuple[int, int, int]) -> DiTFlops:
    """FLOPs of one `WanModel(arch)` forward on one latent of `grid`, every block counted on meta.

    Attention = the `aten.bmm` FLOPs (SDPA's math path on meta) under each block's `self_attn` / `cross_attn`;
    context = the modules that only see the context (the cross-attention `k`/`v` linears run in
    `context_kv`, outside their block's forward); token_linear = the rest.
    """
    f, h, w = grid

    def run(model):
        kw = dict(x=torch.empty(1, arch.out_dim, f, h, w), t=torch.empty(1),
                  context=torch.empty(1, arch.text_len, arch.text_dim))
        if arch.is_i2v:
            kw.update(clip_fea=torch.empty(1, ClipArch().num_tokens, arch.img_dim),
                      y=torch.empty(1, arch.in_dim - arch.out_dim, f, h, w))
        model(**kw)

    counts = _count(lambda: _meta_dit(arch), run)
    total = sum(counts["Global"].values())
    blocks = [f"WanModel.blocks.{i}" for i in range(arch.num_layers)]
    self_attn = sum(_op(counts, b + ".self_attn", "aten.bmm") for b in blocks)
    cross_attn = sum(_op(counts, b + ".cross_attn", "aten.bmm") for b in blocks)
    if self_attn == 0 or self_attn + cross_attn != _op(counts, "Global", "aten.bmm"):
        raise RuntimeError("SDPA was not counted as the DiT's only bmm calls; has its meta dispatch changed?")
    context = sum(sum(v.values()) for k, v in counts.items() if _CONTEXT_MODULES.match(k))
    return DiTFlops(self_attn, cross_attn, total - self_attn - cross_attn - context, context)


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


def _vae():
    from diffusers import AutoencoderKLWan

    from model.vae import vae_config

    return AutoencoderKLWan(**vae_config(VaeArch()))


@functools.cache
def count_vae_decode(grid: tuple[int, int, int]) -> int:
    """Wan VAE decode of one latent (frames, h, w), counted frame by frame on meta: diffusers' chunked
    causal path, as model/vae.py runs it."""
    f, h, w = grid
    counts = _count(_vae, lambda m: m.decode(torch.empty(1, VaeArch().z_dim, f, h, w)))
    return sum(counts["Global"].values())


@functools.cache
def count_vae_encode(frames: int, height: int, width: int) -> int:
    """Wan VAE encode of one RGB video, counted on meta (first frame, then 4-frame chunks)."""
    counts = _count(_vae, lambda m: m.encode(torch.empty(1, 3, frames, height, width)))
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


# --------------------------------------------------------------------------------------------------
# Bytes moved by sequence parallelism
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SPBytes:
    """Bytes SENT by one rank during one DiT forward, by collective (see `sp_bytes_per_forward`)."""

    all_to_all: int
    ring: int
    gather: int

    @property
    def total(self) -> int:
        return self.all_to_all + self.ring + self.gather


def shard_tokens(tokens: int, sp: int) -> int:
    """Tokens per rank: the sequence is zero-padded to a multiple of sp and cut in equal contiguous shards."""
    return math.ceil(tokens / sp)


def sp_bytes_per_forward(arch: DiTArch, tokens: int, ulysses: int, ring: int, dtype_bytes: int = COMPUTE_BYTES,
                         gather_bytes: int = 4, batch: int = 1) -> SPBytes:
    """Bytes one rank sends in one DiT forward under Ulysses x ring sequence parallelism (P = U·R ranks).

    Let s = ceil(tokens / P) be the tokens a rank holds and D = arch.dim = heads x head_dim. Per block (layer):

    * all_to_all: four all-to-alls over the rank's Ulysses group of U ranks. Before self-attention q, k and v
      (each [batch, s, heads, head_dim], after RoPE) go from sequence-sharded to head-sharded; after it the
      attention output [batch, U·s, heads/U, head_dim] goes back. Each call starts from batch·s·D elements
      per rank, keeps 1/U locally and sends the other U-1 chunks: (U-1)/U · batch·s·D elements, in
      `dtype_bytes`. Packing q/k/v into one call moves the same bytes.
    * ring: R-1 ring steps; at each the rank sends its current K block and V block, each
      [batch, U·s, heads/U, head_dim] = batch·s·D elements, to its ring neighbour: 2·(R-1)·batch·s·D elements.

    Once per forward:

    * gather: the all-gather of the head output before unpatchify, [batch, s, prod(patch_size)·out_dim] per
      rank, in `gather_bytes` (4: `WanModel.forward` gathers the float32 head output). A rank sends its
      shard to each of the P-1 others (direct or ring all-gather alike): (P-1)·batch·s·prod(patch)·out_dim.

    Bytes a rank "sends" to itself are not counted. Cross-attention, FFN and the context are local to each
    rank and move nothing; CFG-parallel (`cfg_gather_bytes_per_step`) and FSDP (`fsdp_bytes_per_forward`)
    traffic is separate.
    """
    u, r = ulysses, ring
    s = shard_tokens(tokens, u * r)
    elems = batch * s * arch.dim
    layers = arch.num_layers
    out_channels = math.prod(arch.patch_size) * arch.out_dim
    return SPBytes(
        all_to_all=layers * 4 * elems * (u - 1) // u * dtype_bytes,
        ring=layers * 2 * (r - 1) * elems * dtype_bytes,
        gather=(u * r - 1) * batch * s * out_channels * gather_bytes,
    )


def cfg_gather_bytes_per_step(grid: tuple[int, int, int], z_dim: int = 16, dtype_bytes: int = 4) -> int:
    """CFG-parallel: each of the 2 SP groups' ranks sends its float32 flow [z, F, h, w] to its peer, per step."""
    return math.prod(grid) * z_dim * dtype_bytes


def fsdp_bytes_per_forward(arch: DiTArch, dtype: str, ranks: int) -> int:
    """FSDP all-gather of the DiT weights for one forward: a rank sends its 1/P shard to the P-1 others.

    Gathered in the compute dtype (FSDP MixedPrecision param_dtype bf16 in upstream Wan), or 8 bits when
    the weights are int8/fp8.
    """
    gathered = dit_weight_bytes(arch, "bf16" if dtype == "fp32" else dtype)
    return (ranks - 1) * gathered // ranks


# --------------------------------------------------------------------------------------------------
# Memory per GPU
# --------------------------------------------------------------------------------------------------
_QUANTIZED = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn|ffn)\.")


@functools.cache
def dit_param_counts(arch: DiTArch) -> tuple[int, int, int]:
    """(all parameters, weights of the quantized linears, their output channels) of WanModel(arch).

    The quantized linears are those model/quant.py (and LightX2V) store in 8 bits: every 2-D weight under
    blocks.N.{self_attn, cross_attn, ffn}.
    """
    total = q_weights = q_rows = 0
    for name, p in _meta_dit(arch).named_parameters():
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
            module = _vae()
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


def dit_activation_bytes(arch: DiTArch, tokens: int, sp: int = 1) -> int:
    """Peak activation memory of one DiT forward (batch 1, inference) on one rank, in bytes.

    Walks `model/dit.py` Block.forward with an fp32 residual stream and bf16 linears/attention; per local
    token (s = ceil(tokens/sp)), the larger of the two phases of a block:

    * self-attention: the residual x (fp32, 4·dim) and its modulated norm (fp32, 4·dim), q, k, v (bf16,
      6·dim), the rotated q (bf16, 2·dim) and, while k is rotated, RoPE's float64 copy and float64 complex
      product (8·dim + 8·dim): 32·dim bytes. (Flash/SDPA attention itself keeps O(s) extra, ignored; the
      all-to-all buffers, 12·dim, come after the float64 transients are freed.)
    * FFN: x and its modulated norm (8·dim), its bf16 cast (2·dim), the hidden and GELU outputs
      (bf16, 2·ffn_dim each): 10·dim + 4·ffn_dim bytes.

    Plus, held for the whole forward: the cross-attention K/V of every block (layers · 2 · context · dim · 2 B,
    context = text_len, + 257 CLIP tokens for I2V) and the RoPE table (complex128, 8·head_dim B per local
    token); with sp > 1 also the full patchified sequence and RoPE table every rank builds before sharding
    (tokens · (4·dim + 8·head_dim)).
    """
    dim, ffn, hd = arch.dim, arch.ffn_dim, arch.head_dim
    s = shard_tokens(tokens, sp)
    per_token = max(32 * dim, 10 * dim + 4 * ffn)
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
# blocks: 9,458 bytes per output pixel for the Wan2.1 VAE (measured: diffusers AutoencoderKLWan's decoder
# feature cache after >= 2 latent frames, exactly linear in pixels; 3.52 GiB at 832x480). Held on rank 0 only.
STREAM_DECODER_BYTES_PER_PIXEL = 9458


def stream_decoder_bytes(width: int, height: int) -> int:
    return STREAM_DECODER_BYTES_PER_PIXEL * width * height


def cross_cache_bytes(arch: DiTArch, dtype_bytes: int = COMPUTE_BYTES) -> int:
    """Cross-attention K/V of one session's prompt (+ image), computed once and kept: layers x 2 x ctx x dim."""
    context = arch.text_len + (ClipArch().num_tokens if arch.is_i2v else 0)
    return arch.num_layers * 2 * context * arch.dim * dtype_bytes


# --------------------------------------------------------------------------------------------------
# Calibration: efficiencies fitted to Wan2.1's published H100 figures
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    mfu: float  # DiT and T5 FLOP/s achieved / dense BF16 peak
    vae_eff: float  # VAE decode/encode FLOP/s achieved / dense TF32 peak
    comm_eff: float  # effective collective bandwidth / link_bw (SP all-to-all and ring, FSDP, CFG gathers)
    vae_bytes_per_pixel: float  # VAE decode working memory per output pixel (fitted to published peaks)
    source: str = ""


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
    """How Wan2.1's generate.py ran the published points: fp32 DiT weights (bf16 autocast), T5 in bf16."""
    return Workload(model="14B", task=task, width=1280, height=720, frames=81, steps=50 if task == "t2v" else 40,
                    cfg=True, ulysses=gpus, dtype="fp32", fsdp=gpus > 1, offload=gpus == 1)


# --------------------------------------------------------------------------------------------------
# Projection: seconds per video
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Terms:
    """Seconds of one video at 100 % efficiency, grouped by the efficiency that divides them."""

    flops_s: float  # DiT + T5 (+ CLIP) at the BF16 peak: divided by mfu
    vae_s: float  # VAE at the TF32 peak: divided by vae_eff
    comm_s: float  # collectives at link_bw, none overlapped with compute (ring: pessimistic): divided by comm_eff
    fixed_s: float  # offload over PCIe and int8/fp8 dequantization at HBM bandwidth: taken as is


def _terms(w: Workload, gpu: GPU) -> dict[str, Terms]:
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


def project(w: Workload, gpu: GPU | str = "H100", cal: Calibration | None = None) -> Projection:
    """Seconds per video of workload w on gpu, with efficiencies from `cal` (default: `calibration_for(gpu)`)."""
    cal = cal or calibration_for(gpu if isinstance(gpu, str) else "H100")
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    terms = _terms(w, gpu)
    dit = terms["dit"]
    return Projection(gpu.name, w.gpus, {k: _seconds(t, cal) for k, t in terms.items()},
                      dit.flops_s / cal.mfu + dit.fixed_s, dit.comm_s / cal.comm_eff)


def replicas_for(target_videos_per_minute: float, projection: Projection) -> int:
    """Replicas (each `projection.gpus` GPUs) to sustain a target rate."""
    return max(1, math.ceil(target_videos_per_minute * projection.total_s / 60.0 - 1e-9))


# --------------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------------
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
            rows.append(FitRow(task, p.gpus, p.seconds, project(w, GPUS[gpu], cal).total_s, p.peak_gb,
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
    terms = [list(_terms(w, g).values()) for w in workloads]
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


# --------------------------------------------------------------------------------------------------
# Memory per GPU and CausVid sessions
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes on the busiest GPU (rank 0: it also decodes) of one replica, as wanserve runs it."""

    dit_weights: int
    t5_weights: int
    clip_weights: int  # I2V only
    vae_weights: int
    dit_activations: int  # peak of one forward (`dit_activation_bytes`)
    vae_decode: int  # decode working memory (calibrated per output pixel)
    capacity: float
    causvid_session: int  # one session on rank 0: its K/V cache share, cross-attention cache, VAE decoder state
    causvid_activations: int  # one CausVid block forward

    @property
    def weights(self) -> int:
        return self.dit_weights + self.t5_weights + self.clip_weights + self.vae_weights

    @property
    def peak(self) -> int:
        """One video at a time: weights plus the larger of the DiT forward and the VAE decode."""
        return self.weights + max(self.dit_activations, self.vae_decode)

    @property
    def fits(self) -> bool:
        return self.peak + RESERVED_BYTES <= self.capacity

    @property
    def causvid_sessions(self) -> int:
        """KV caches that fit next to the weights and one forward's (or decode's) working memory."""
        free = self.capacity - RESERVED_BYTES - self.weights - max(self.causvid_activations, self.vae_decode)
        return max(0, int(free // self.causvid_session))


def memory(w: Workload, gpu: GPU | str = "H100", cal: Calibration | None = None) -> Memory:
    cal = cal or calibration_for(gpu if isinstance(gpu, str) else "H100")
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    arch, shard = w.arch, (w.sp if w.fsdp else 1)
    window = w.causvid_window or w.grid[0]
    block_tokens = min(window, w.causvid_block_frames) * w.frame_tokens
    return Memory(
        dit_weights=dit_weight_bytes(arch, w.dtype) // shard,
        t5_weights=(t5_weight_bytes() // shard) if w.t5_on_gpu else 0,
        clip_weights=clip_weight_bytes() if w.task == "i2v" else 0,
        vae_weights=vae_weight_bytes(),
        dit_activations=dit_activation_bytes(arch, w.tokens, w.sp),
        vae_decode=int(cal.vae_bytes_per_pixel * w.width * w.height),
        capacity=gpu.memory_bytes,
        # rank 0's share of a session: the K/V cache split over the SP group (Ulysses by heads, ring by
        # tokens); the prompt's cross-attention K/V on every rank; the streaming VAE decoder state (rank 0)
        causvid_session=(causvid_cache_bytes(arch, w.frame_tokens, window) // w.sp + cross_cache_bytes(arch)
                         + stream_decoder_bytes(w.width, w.height)),
        causvid_activations=dit_activation_bytes(arch, block_tokens, w.sp),
    )


# --------------------------------------------------------------------------------------------------
# Report for one workload (the CLI prints it as JSON)
# --------------------------------------------------------------------------------------------------
def report(w: Workload, gpu: str = "H100", target_vpm: float | None = None) -> dict:
    fit = calibrate(CALIBRATED_ON[gpu])
    cal = fit.calibration
    arch = w.arch
    dit = dit_forward_flops(arch, w.grid)
    proj = project(w, gpu, cal)
    mem = memory(w, gpu, cal)
    sp = sp_bytes_per_forward(arch, w.tokens, w.ulysses, w.ring)
    out = {
        "workload": {**asdict(w), "tokens": w.tokens, "latent_grid": list(w.grid), "gpus": w.gpus},
        "flops": {
            "dit_forward": {**asdict(dit), "attention": dit.attention, "total": dit.total},
            "dit_forwards_per_video": w.steps * (2 if w.cfg else 1),
            "t5_per_prompt": t5_flops(arch.text_len),
            "vae_decode": vae_decode_flops(w.grid),
            **({"clip": clip_flops(), "vae_encode": vae_encode_flops(w.frames, w.height, w.width)}
               if w.task == "i2v" else {}),
        },
        "sp_bytes_per_forward_per_rank": {**asdict(sp), "total": sp.total},
        "fsdp_bytes_per_forward_per_rank": fsdp_bytes_per_forward(arch, w.dtype, w.sp) if w.fsdp else 0,
        "cfg_gather_bytes_per_step_per_rank": (cfg_gather_bytes_per_step(w.grid, arch.out_dim)
                                               if w.cfg_parallel == 2 else 0),
        "memory_gb": {k: round(v / GB, 3) for k, v in asdict(mem).items()}
        | {"weights": round(mem.weights / GB, 3), "peak": round(mem.peak / GB, 3), "fits": mem.fits,
           "reserved": RESERVED_BYTES / GB, "causvid_sessions_per_gpu": mem.causvid_sessions},
        "seconds": {"gpu": proj.gpu, **{k: round(v, 3) for k, v in proj.stages.items()},
                    "dit_compute": round(proj.dit_compute_s, 3), "dit_comm": round(proj.dit_comm_s, 3),
                    "total": round(proj.total_s, 3), "videos_per_minute_per_replica": round(proj.videos_per_minute, 3)},
        "calibration": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(cal).items()}
        | {"calibrated_on": CALIBRATED_ON[gpu], "max_fit_error": round(fit.max_error, 4),
           "comm_eff_range": [round(c, 4) for c in fit.comm_range], "range_tolerance": RANGE_TOLERANCE,
           "dit_seconds_at_lowest_comm_eff": round(project(w, gpu, replace(cal, comm_eff=fit.comm_range[0])).dit_s, 3)},
    }
    if target_vpm is not None:
        n = replicas_for(target_vpm, proj)
        out["replicas"] = {"target_videos_per_minute": target_vpm, "replicas": n, "gpus": n * w.gpus}
    return out
