"""The block-causal mask of CausVid's full-sequence forward (training; the cache's reference): which frames a
block sees, as `KVCache` (model/causal.py) holds them."""
from __future__ import annotations

import torch

from .kernels import SDPA, AttentionKernel, attention


# --------------------------------------------------------------------------------------------------
def block_causal_mask(frames: int, block_frames: int, window: int | None = None, sink: int = 0) -> torch.Tensor:
    """bool [frames, frames]: may query frame i see key frame j (blocks of `block_frames` from frame 0)?

    j < end of i's block, and with a window also (j < sink or j >= end - (window - sink)): exactly the
    frames `KVCache` holds when that block is written.
    """
    if frames < 1 or block_frames < 1:
        raise ValueError(f"frames = {frames}, block_frames = {block_frames}: both must be >= 1")
    idx = torch.arange(frames)
    end = (idx // block_frames + 1) * block_frames
    key = idx[None, :]
    mask = key < end[:, None]
    if window is not None:
        mask &= (key < sink) | (key >= end[:, None] - (window - sink))
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     kernel: AttentionKernel = SDPA) -> torch.Tensor:
    """[B, L, H, D] attention under a dense bool [Lq, Lk] mask (True = attend): SDPA only (the CUDA kernels
    take no dense mask), so another configured kernel is an error, not a quiet switch."""
    if kernel is not SDPA:
        raise ValueError(f"the block-causal full-sequence forward needs torch_sdpa (a dense mask); the DiT is "
                         f"configured with {kernel.name}")
    return attention(q, k, v, attn_mask=mask)
