"""The one attention function of the DiT, and the seam where sequence parallelism plugs in.

Every self-attention call of `WanModel` goes through a `TokenLayout`: the default one is a single process
holding all tokens (SDPA). `parallel/` provides another layout that shards tokens over a process group;
the model code is the same either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention on [B, L, H, D] tensors (scale 1/sqrt(D)).

    key_mask: bool [B, Lk] (or [Lk]), True = attend. Computed in the dtype of q.
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v.to(q.dtype)))
    mask = None
    if key_mask is not None:
        mask = key_mask.view(-1, 1, 1, key_mask.shape[-1]) if key_mask.dim() == 2 else key_mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(qt, kt.to(q.dtype), vt, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)


class TokenLayout:
    """How the video tokens of one forward are laid out over processes. This one: all tokens here."""

    sharded = False

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """Keep this process's part of a [B, L, ...] tensor (dim 1 = tokens)."""
        return x

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Reassemble the full [B, length, ...] tensor from every process's part."""
        return x

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full bidirectional attention of this process's queries over all keys of the sequence."""
        return attention(q, k, v)


LOCAL = TokenLayout()
