"""The seam where sequence parallelism plugs into the DiT: where the tokens of a forward live.

Every self-attention call of `WanModel` goes through a `TokenLayout` with the block's configured kernel
(model/kernels.py): the default layout is a single process holding all tokens. `parallel/` provides
another layout that shards tokens over a process group; the model code is the same either way.
"""
from __future__ import annotations

import torch

from .kernels import SDPA, AttentionKernel


class TokenLayout:
    """How the video tokens of one forward are laid out over processes. This one: all tokens here."""

    sharded = False

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """Keep this process's part of a [B, L, ...] tensor (dim 1 = tokens)."""
        return x

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Reassemble the full [B, length, ...] tensor from every process's part."""
        return x

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kernel: AttentionKernel = SDPA) -> torch.Tensor:
        """Full bidirectional attention of this process's queries over all keys of the sequence."""
        return kernel(q, k, v)


LOCAL = TokenLayout()
