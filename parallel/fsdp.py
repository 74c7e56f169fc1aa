"""Optional weight sharding of the DiT over its SP group (`parallel.dit_fsdp`), with torch's FSDP2.

Under sequence parallelism every rank runs every layer, so by default every rank holds all the weights
(14B in bf16: 28 GB per GPU). `fully_shard` keeps 1/sp of each parameter per rank and all-gathers a
block's weights just before it runs (freeing them after), trading one all-gather per block for memory.

Units: each `Block`, each block's `cross_attn` separately, and the root (embeddings, head). The cross-
attention is its own unit because `WanModel.forward` computes every block's context K/V (`context_kv`)
before the block loop, outside `Block.forward`; `register_fsdp_forward_method` makes that method unshard
too. Every parameter is split along its largest dimension, so the [1, 6, dim] modulations split as well.
Works with gloo on CPU and nccl on CUDA.
"""
from __future__ import annotations

import torch

from .group import Group


def shard_dit(dit: torch.nn.Module, group: Group) -> torch.nn.Module:
    """Shard the DiT's parameters over `group.sp` in place; forward stays as it was."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import Shard

    if group.sp.size == 1:
        return dit
    mesh = DeviceMesh.from_group(group.sp.pg, group.device.type)

    def largest_dim(p: torch.Tensor) -> Shard:
        return Shard(max(range(p.dim()), key=lambda d: p.shape[d]))

    kw = dict(mesh=mesh, reshard_after_forward=True, shard_placement_fn=largest_dim)
    for blk in dit.blocks:
        fully_shard(blk.cross_attn, **kw)
        register_fsdp_forward_method(blk.cross_attn, "context_kv")
        fully_shard(blk, **kw)
    fully_shard(dit, **kw)
    return dit


def parameter_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters held by this rank, bytes of the whole parameters)."""
    local = full = 0
    for p in module.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        local += t.numel() * t.element_size()
        full += p.numel() * p.element_size()
    return local, full
