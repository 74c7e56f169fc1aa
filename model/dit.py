"""Wan2.1 diffusion transformer (T2V and I2V), with the official module and state-dict names.

We own this module because the hot path changes under us: sequence parallelism (`TokenLayout`), the
CausVid KV cache, quantized and LoRA-merged linears. Numerics follow upstream `wan/modules/model.py`:
fp32 residual stream, modulation and norms; float64 RoPE and time sinusoids; linears and attention in the
dtype of their weights (bf16 on GPU, fp32 on CPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .archs import DiTArch
from .attention import LOCAL, TokenLayout
from .kernels import SDPA, DiTKernels

ROPE_MAX_POSITIONS = 1024


class Linear(nn.Linear):
    """nn.Linear that casts its input to the weight dtype (bf16 weights under an fp32 residual stream)."""

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Conv3d(nn.Conv3d):
    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (upstream WanLayerNorm)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """cos-first sinusoidal embedding of (possibly fractional) timesteps, in float64."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    sinusoid = torch.outer(position, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_params(max_positions: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64),
                        1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)  # complex128 [max_positions, dim/2]


def rope_table(head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis rotation tables (time, height, width): 3-D RoPE with separate frequency bases."""
    hw = 2 * (head_dim // 6)
    return (rope_params(ROPE_MAX_POSITIONS, head_dim - 2 * hw), rope_params(ROPE_MAX_POSITIONS, hw),
            rope_params(ROPE_MAX_POSITIONS, hw))


def rope_freqs(tables, grid: tuple[int, int, int], frame_offset: int = 0) -> torch.Tensor:
    """complex128 [f*h*w, head_dim/2] rotations of the tokens of a (f, h, w) grid, row-major order.

    frame_offset: absolute index of the first latent frame (CausVid blocks continue the video).
    """
    f, h, w = grid
    if frame_offset + f > ROPE_MAX_POSITIONS or h > ROPE_MAX_POSITIONS or w > ROPE_MAX_POSITIONS:
        raise ValueError(f"RoPE covers {ROPE_MAX_POSITIONS} positions per axis; grid {grid} at frame "
                         f"{frame_offset} is beyond it")
    ft, fh, fw = tables
    return torch.cat([
        ft[frame_offset:frame_offset + f].view(f, 1, 1, -1).expand(f, h, w, -1),
        fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, H, D] by freqs [L, D/2] (float64 math)."""
    b, s, n, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, s, n, d // 2, 2))
    out = torch.view_as_real(xc * freqs.view(1, s, 1, d // 2)).flatten(3)
    return out.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.kernel = SDPA  # model/kernels.py; WanModel.use_kernels sets the configured one

    def qkv(self, x: torch.Tensor, freqs: torch.Tensor):
        """Rotated q, k and raw v as [B, L, H, D] (the CausVid cache stores k after RoPE)."""
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(shape)
        k = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        return apply_rope(q, freqs), apply_rope(k, freqs), v

    def forward(self, x, freqs, attend):
        """attend(q, k, v, kernel) -> [B, L, H, D]: the layout's attention, or the CausVid cache's."""
        q, k, v = self.qkv(x, freqs)
        return self.o(attend(q, k, v, self.kernel).flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention; with image=True also the I2V image branch (k_img/v_img), summed before `o`."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.image = image
        self.kernel = self.image_kernel = SDPA  # text / image branch (cross_attn_1_type / cross_attn_2_type)
        if image:
            self.k_img, self.v_img = Linear(dim, dim), Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim)

    def context_kv(self, context: torch.Tensor, img_context: torch.Tensor | None):
        """K/V of the (fixed) context; computed once per forward, or once per CausVid session."""
        kv = (self._heads(self.norm_k(self.k(context))), self._heads(self.v(context)))
        if self.image:
            kv += (self._heads(self.norm_k_img(self.k_img(img_context))), self._heads(self.v_img(img_context)))
        return kv

    def forward(self, x, kv):
        q = self._heads(self.norm_q(self.q(x)))
        out = self.kernel(q, kv[0], kv[1]).flatten(2)
        if self.image:
            out = out + self.image_kernel(q, kv[2], kv[3]).flatten(2)
        return self.o(out)


class Block(nn.Module):
    def __init__(self, arch: DiTArch):
        super().__init__()
        dim = arch.dim
        self.norm1 = LayerNorm(dim, eps=arch.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, arch.num_heads, arch.qk_norm, arch.eps)
        self.norm3 = LayerNorm(dim, eps=arch.eps, elementwise_affine=True) if arch.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, arch.num_heads, arch.qk_norm, arch.eps, image=arch.is_i2v)
        self.norm2 = LayerNorm(dim, eps=arch.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(dim, arch.ffn_dim), nn.GELU(approximate="tanh"), Linear(arch.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def modulate(self, e0: torch.Tensor):
        """(shift, scale, gate) for attention and for the FFN; e0 [B, T, 6, dim] with T = 1 or tokens."""
        e = self.modulation.float().unsqueeze(1) + e0
        return e.unbind(2)

    def forward(self, x, e0, freqs, ctx_kv, attend):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulate(e0)
        y = self.self_attn(self.norm1(x) * (1 + scale_a) + shift_a, freqs, attend)
        x = x + y.float() * gate_a
        x = x + self.cross_attn(self.norm3(x), ctx_kv).float()
        y = self.ffn(self.norm2(x) * (1 + scale_f) + shift_f)
        return x + y.float() * gate_f


class Head(nn.Module):
    def __init__(self, arch: DiTArch):
        super().__init__()
        self.norm = LayerNorm(arch.dim, eps=arch.eps, elementwise_affine=False)
        self.head = Linear(arch.dim, math.prod(arch.patch_size) * arch.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, arch.dim) / arch.dim ** 0.5)

    def forward(self, x, e):
        """e: [B, T, dim] time embedding (not the projected e0)."""
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(in_dim, eps=1e-5), Linear(in_dim, in_dim), nn.GELU(),
                                  Linear(in_dim, out_dim), LayerNorm(out_dim, eps=1e-5))

    def forward(self, x):
        return self.proj(x)


class WanModel(nn.Module):
    """The Wan2.1 DiT. `layout` decides where the tokens of a forward live (see model/attention.py)."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        self.arch = arch
        dim = arch.dim
        self.patch_embedding = Conv3d(arch.in_dim, dim, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.text_embedding = nn.Sequential(Linear(arch.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear(arch.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.num_layers))
        self.head = Head(arch)
        if arch.is_i2v:
            self.img_emb = MLPProj(arch.img_dim, dim)
        self.layout: TokenLayout = LOCAL
        self._rope = None  # per-axis tables, built on first use (not state: not in the state dict)

    # ---- initialisation (training from scratch; loaded checkpoints overwrite it) ----
    def init_weights(self) -> "WanModel":
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        return self

    # ---- attention kernels ----
    def use_kernels(self, kernels: DiTKernels) -> "WanModel":
        """Run every block's attention with these kernels (model/kernels.py)."""
        for blk in self.blocks:
            blk.self_attn.kernel = kernels.self_attn
            blk.cross_attn.kernel, blk.cross_attn.image_kernel = kernels.cross_text, kernels.cross_image
        self._kernels = kernels
        return self

    @property
    def kernels(self) -> DiTKernels:
        return getattr(self, "_kernels", None) or DiTKernels()

    # ---- pieces shared with the causal model ----
    def rope_tables(self):
        if self._rope is None:
            self._rope = rope_table(self.arch.head_dim)
        return self._rope

    def patchify(self, x: torch.Tensor):
        """[B, C, F, H, W] -> tokens [B, L, dim], grid (f, h, w)."""
        arch = self.arch
        if x.dim() != 5 or x.shape[1] != arch.in_dim:
            raise ValueError(f"DiT input must be [B, {arch.in_dim}, F, H, W]; got {tuple(x.shape)}")
        for size, p, name in zip(x.shape[2:], arch.patch_size, ("frames", "height", "width")):
            if size % p:
                raise ValueError(f"latent {name} {size} is not a multiple of the patch size {p}")
        x = self.patch_embedding(x)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float(), grid

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """tokens [B, L, prod(patch)*out] -> [B, out, F, H, W]."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.arch.patch_size
        c = self.arch.out_dim
        x = x.view(b, f, h, w, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, c, f * pt, h * ph, w * pw)

    def time_embed(self, t: torch.Tensor):
        """t [B] or [B, T] (raw timesteps, e.g. 999 or 937.5) -> e [B, T, dim], e0 [B, T, 6, dim] (fp32)."""
        if t.dim() == 2 and bool((t == t[:, :1]).all()):
            t = t[:, :1]  # one timestep per sample: no per-token modulation needed
        if t.dim() == 1:
            t = t[:, None]
        b, n = t.shape
        sin = sinusoidal_embedding_1d(self.arch.freq_dim, t.reshape(-1)).float()
        e = self.time_embedding(sin).float()
        e0 = self.time_projection(e).float().unflatten(1, (6, self.arch.dim))
        return e.view(b, n, -1), e0.view(b, n, 6, -1)

    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None) -> torch.Tensor:
        """Text [B, L<=text_len, text_dim] (zero-padded to text_len, as upstream) (+ CLIP tokens in front)."""
        arch = self.arch
        if context.dim() != 3 or context.shape[-1] != arch.text_dim or context.shape[1] > arch.text_len:
            raise ValueError(f"context must be [B, <= {arch.text_len}, {arch.text_dim}]; got {tuple(context.shape)}")
        if context.shape[1] < arch.text_len:
            context = F.pad(context, (0, 0, 0, arch.text_len - context.shape[1]))
        ctx = self.text_embedding(context).float()
        if arch.is_i2v:
            if clip_fea is None:
                raise ValueError("an i2v model needs clip_fea (CLIP image tokens)")
            ctx = torch.cat([self.img_emb(clip_fea).float(), ctx], dim=1)
        return ctx

    def context_kv(self, ctx: torch.Tensor):
        """Per-block cross-attention K/V from the embedded context."""
        n_img = ctx.shape[1] - self.arch.text_len
        img, txt = (ctx[:, :n_img], ctx[:, n_img:]) if self.arch.is_i2v else (None, ctx)
        return [blk.cross_attn.context_kv(txt, img) for blk in self.blocks]

    def per_token(self, e: torch.Tensor, grid) -> torch.Tensor:
        """Expand per-frame conditioning [B, F, ...] to per-token [B, L, ...] (T = 1 stays as is)."""
        if e.shape[1] == 1:
            return e
        f, h, w = grid
        if e.shape[1] != f:
            raise ValueError(f"timesteps per frame ({e.shape[1]}) do not match the latent frames ({f})")
        return e.repeat_interleave(h * w, dim=1)

    # ---- forward ----
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, out_dim, F, H, W] latents; t [B] or [B, F] timesteps; context [B, Lt, text_dim];
        clip_fea [B, 257, img_dim] and y [B, in_dim-out_dim, F, H, W] for I2V. Returns the flow [B, out, F, H, W]."""
        arch = self.arch
        if arch.is_i2v:
            if y is None:
                raise ValueError("an i2v model needs y (mask + image latent)")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.patchify(x)
        length = tokens.shape[1]
        freqs = rope_freqs(self.rope_tables(), grid).to(tokens.device)
        e, e0 = self.time_embed(t.to(tokens.device))
        e, e0 = self.per_token(e, grid), self.per_token(e0, grid)
        kv = self.context_kv(self.embed_context(context, clip_fea))

        layout = self.layout
        tokens, freqs = layout.shard(tokens), layout.shard(freqs[None])[0]
        if e.shape[1] > 1:
            e, e0 = layout.shard(e), layout.shard(e0)
        for blk, blk_kv in zip(self.blocks, kv):
            tokens = blk(tokens, e0, freqs, blk_kv, layout.self_attention)
        out = self.head(tokens, e).float()
        out = layout.gather(out, length)
        return self.unpatchify(out, grid)
