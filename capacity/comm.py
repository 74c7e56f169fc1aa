"""Bytes one rank sends per DiT forward under sequence parallelism (and FSDP / CFG-parallel), in closed form.

Closed form so that a CPU/gloo run of `parallel/` can be instrumented against it
(tests/test_parallel_sp.py counts the bytes the real collectives send).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from capacity.footprint import dit_weight_bytes
from capacity.workload import COMPUTE_BYTES, shard_tokens
from model.archs import DiTArch


@dataclass(frozen=True)
class SPBytes:
    """Bytes SENT by one rank during one DiT forward, by collective (see `sp_bytes_per_forward`)."""

    all_to_all: int
    ring: int
    gather: int

    @property
    def total(self) -> int:
        return self.all_to_all + self.ring + self.gather


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
