"""Int8 K/V token buffers for the CausVid cache (`kv_cache_quant = "int8"`), KIVI-style per-group scales.

A window of cached K/V is most of a long session's memory (14B 480p: ~1.2 GiB per latent frame in bf16). Each
token's head vector is split into groups of `group` channels with one symmetric scale per group (absmax / 127),
so a bf16 cache shrinks to 1/2 + 2/group of its bytes (fp32 scales). Every element is off by at most
absmax(its group) / 254: the bound tests/test_long_video.py checks, with the block outputs' error measured
there. The buffer reads and writes like the [B, tokens, H, D] tensor it replaces (`buf[:, a:b] = x`, `buf[:, a:b]`
dequantized to the compute dtype), so the cache code is the same for both.
"""
from __future__ import annotations

import torch

GROUP = 64  # channels per scale (LightX2V's KIVI group)


def group_size(head_dim: int) -> int:
    return GROUP if head_dim % GROUP == 0 else head_dim


class Int8Tokens:
    """int8 values [B, N, H, D] + fp32 scales [B, N, H, D / group]; `dtype` is what reads return."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device):
        self.group = group_size(shape[3])
        self.q = torch.zeros(shape, dtype=torch.int8, device=device)
        self.scale = torch.zeros((*shape[:3], shape[3] // self.group), dtype=torch.float32, device=device)
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def __setitem__(self, index, x: torch.Tensor) -> None:
        g = x.float().unflatten(-1, (-1, self.group))
        scale = g.abs().amax(-1).clamp_min(1e-12) / 127.0
        self.q[index] = torch.round(g / scale[..., None]).to(torch.int8).flatten(-2)
        self.scale[index] = scale

    def __getitem__(self, index) -> torch.Tensor:
        q, scale = self.q[index], self.scale[index]
        return (q.float().unflatten(-1, (-1, self.group)) * scale[..., None]).flatten(-2).to(self.dtype)

    def to(self, device, copy: bool = False) -> "Int8Tokens":
        out = Int8Tokens.__new__(Int8Tokens)
        out.group, out.dtype = self.group, self.dtype
        out.q, out.scale = self.q.to(device, copy=copy), self.scale.to(device, copy=copy)
        return out
