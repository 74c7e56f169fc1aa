"""Wan2.1 diffusion transformer (T2V and I2V), with the official module and state-dict names.

We own this module because the hot path changes under us: sequence parallelism (`TokenLayout`), the
CausVid KV cache, quantized and LoRA-merged linears. Numerics follow upstream `wan/modules/model.py`:
fp32 residual stream, modulation and norms; float64 time sinusoids and RoPE angles (the rotation itself in
fp32, within fp32 round-off of upstream's complex128); linears and attention in the dtype of their weights
(bf16 on GPU, fp32 on CPU). Without autograd a block updates the tensors it made in place (CPU: a fresh
tensor costs more than the pass that fills it); benchmarks/dit_vs_diffusers.py times it against diffusers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
        """Upstream's `(x.float() * rsqrt(mean(x^2) + eps)).type_as(x) * weight`; the mean square comes from one
        reduction (vector_norm) instead of a materialized x^2."""
        xf = x.float()
        rstd = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / xf.shape[-1] + self.eps)
        y, w = (xf * rstd).to(x.dtype), self.weight.to(x.dtype)
        if torch.is_grad_enabled() and (y.requires_grad or w.requires_grad):
            return y * w
        return y.mul_(w)  # in place on our own y: no new tensor


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (upstream WanLayerNorm)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def modulated_norm(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`norm(x) * (1 + scale) + shift` in fp32; shift/scale [B, T, dim] with T = 1 or one row per token.

    When one row serves every token (B = T = 1, the usual call) and the norm has no affine of its own, the
    modulation is the layer norm's affine: one pass over x instead of three. Otherwise one addcmul.
    """
    if (x.dtype == torch.float32 and shift.shape[0] * shift.shape[1] == 1 and isinstance(norm, LayerNorm)
            and norm.weight is None and norm.bias is None):
        return F.layer_norm(x, norm.normalized_shape, scale.reshape(-1) + 1, shift.reshape(-1), norm.eps)
    return torch.addcmul(shift, norm(x).float(), scale + 1)


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """cos-first sinusoidal embedding of (possibly fractional) timesteps, in float64."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    sinusoid = torch.outer(position, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_params(max_positions: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """float64 angles [max_positions, dim/2]: position p turns channel pair i by p * theta^(-2i/dim) (upstream)."""
    return torch.outer(torch.arange(max_positions, dtype=torch.float64),
                       1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)))


def _cos_sin(angles: torch.Tensor) -> torch.Tensor:
    """fp32 [P, 2, 2n] rotation rows of float64 angles [P, n]: row 0 = (cos, cos) per channel pair, row 1 =
    (-sin, sin), so pair (a, b) turns into (a cos - b sin, b cos + a sin) (see apply_rope)."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)], 1).flatten(2).float()


def rope_table(head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis rotation tables (time, height, width): 3-D RoPE with separate frequency bases.

    fp32 [ROPE_MAX_POSITIONS, 2, axis channels] (see _cos_sin): cos and sin are taken of the float64 angles and
    rounded once, so the fp32 rotation stays within fp32 round-off of upstream's complex128 one."""
    hw = 2 * (head_dim // 6)
    return tuple(_cos_sin(rope_params(ROPE_MAX_POSITIONS, d)) for d in (head_dim - 2 * hw, hw, hw))


def rope_freqs(tables, grid: tuple[int, int, int], frame_offset: int = 0, unbounded: bool = False) -> torch.Tensor:
    """fp32 [f*h*w, 2, head_dim] rotations (cos row, signed-sin row) of a (f, h, w) grid's tokens, row-major.

    frame_offset: absolute index of the first latent frame (CausVid blocks continue the video). unbounded: temporal
    rows past the table are computed from their float64 angles (identical to the table's rows inside it), for the
    CausVid window whose attention only sees position differences (model/causal.py).
    """
    f, h, w = grid
    ft, fh, fw = tables
    if h > ROPE_MAX_POSITIONS or w > ROPE_MAX_POSITIONS or (frame_offset + f > ROPE_MAX_POSITIONS and not unbounded):
        raise ValueError(f"RoPE covers {ROPE_MAX_POSITIONS} positions per axis; grid {grid} at frame "
                         f"{frame_offset} is beyond it")
    if frame_offset < 0:
        raise ValueError(f"frame_offset = {frame_offset}: must be >= 0")
    if frame_offset + f <= ft.shape[0]:
        time = ft[frame_offset:frame_offset + f]
    else:
        time = time_rotation(torch.arange(frame_offset, frame_offset + f, dtype=torch.float64), ft.shape[-1])
    return torch.cat([
        time.view(f, 1, 1, 2, -1).expand(f, h, w, 2, -1),
        fh[:h].view(1, h, 1, 2, -1).expand(f, h, w, 2, -1),
        fw[:w].view(1, 1, w, 2, -1).expand(f, h, w, 2, -1),
    ], dim=-1).reshape(f * h * w, 2, -1)


def time_rotation(positions: torch.Tensor, time_channels: int) -> torch.Tensor:
    """fp32 [P, 2, time_channels] temporal rotation rows at float64 `positions` (any value, also past the table or
    negative): the same angles `rope_params` gives, so the same rows where the table has them."""
    inv = 1.0 / torch.pow(10000.0, torch.arange(0, time_channels, 2, dtype=torch.float64).div(time_channels))
    return _cos_sin(torch.outer(positions.to(torch.float64), inv))


def time_shift(head_dim: int, shift: int) -> torch.Tensor:
    """fp32 [1, 2, head_dim]: the rotation that moves a rotated key `shift` latent frames later in time and nowhere
    in space (apply_rope broadcasts it over every token). RoPE rotations compose, so a key rotated at frame p and
    then shifted is the key rotated at p + shift, up to one fp32 rounding."""
    t = head_dim - 4 * (head_dim // 6)
    time = time_rotation(torch.tensor([float(shift)]), t)
    space = torch.zeros(1, 2, head_dim - t)
    space[:, 0] = 1.0  # cos 0, sin 0: the spatial channels stay
    return torch.cat([time, space], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, H, D] by freqs [L, 2, D] (rope_freqs; or [1, 2, D], one
    rotation for every token: time_shift), in fp32.

    out = x * cos + swap(x) * signed sin, the swapped term added in place on the pair views (no copy of x).
    """
    d = x.shape[3]
    xf = x.float()
    cos, sin = freqs.reshape(1, freqs.shape[0], 2, 1, d).unbind(2)  # [L | 1, 2, D]: per token, or one for all
    out = xf * cos
    o, xp, sp = (t.unflatten(-1, (d // 2, 2)) for t in (out, xf, sin))
    o[..., 0].addcmul_(xp[..., 1], sp[..., 0])
    o[..., 1].addcmul_(xp[..., 0], sp[..., 1])
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
        """(shift, scale, gate) for attention and for the FFN; e0 [B, T, 6, dim] with T = 1 or tokens.

        Each is added on its own (T = tokens: six [B, L, dim] tensors, not one [B, L, 6, dim])."""
        m = self.modulation.float()
        return tuple(e0[:, :, i] + m[:, i] for i in range(6))

    def _ffn(self, x):
        """ffn(x), with the tanh GELU in place on the hidden state where nothing needs it for a gradient: the
        [L, ffn_dim] tensor is the block's largest, and a second one costs a fresh allocation per call."""
        fc1, act, fc2 = self.ffn
        h = fc1(x)
        if type(act) is nn.GELU and not h.requires_grad:
            return fc2(torch.ops.aten.gelu_(h, approximate=act.approximate))
        return fc2(act(h))

    def forward(self, x, e0, freqs, ctx_kv, attend):
        x = x.contiguous()  # patchify's tokens are a transposed view: strided, every op on them would be slow
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulate(e0)
        y = self.self_attn(modulated_norm(self.norm1, x, shift_a, scale_a), freqs, attend)
        x = torch.addcmul(x, y.float(), gate_a)  # a new tensor (the caller's x stays): below, ours to update in place
        inplace = not torch.is_grad_enabled()  # no autograd graph holds x
        y = self.cross_attn(self.norm3(x), ctx_kv).float()
        x = x.add_(y) if inplace else x + y
        y = self._ffn(modulated_norm(self.norm2, x, shift_f, scale_f)).float()
        return x.addcmul_(y, gate_f) if inplace else torch.addcmul(x, y, gate_f)


class Head(nn.Module):
    def __init__(self, arch: DiTArch):
        super().__init__()
        self.norm = LayerNorm(arch.dim, eps=arch.eps, elementwise_affine=False)
        self.head = Linear(arch.dim, math.prod(arch.patch_size) * arch.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, arch.dim) / arch.dim ** 0.5)

    def forward(self, x, e):
        """e: [B, T, dim] time embedding (not the projected e0)."""
        m = self.modulation.float()
        return self.head(modulated_norm(self.norm, x, e + m[:, 0], e + m[:, 1]))


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
    def init_weights(self) -> WanModel:
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
    def use_kernels(self, kernels: DiTKernels) -> WanModel:
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
        key, cached = (grid, tokens.device), getattr(self, "_grid_freqs", None)
        if cached is None or cached[0] != key:  # one grid per request size: build its rotations once
            cached = self._grid_freqs = (key, rope_freqs(self.rope_tables(), grid).to(tokens.device))
        freqs = cached[1]
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
