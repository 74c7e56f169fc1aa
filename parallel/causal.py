"""CausVid under sequence parallelism: the K/V cache sharded the way the SP scheme shards K/V.

The causal DiT (model/causal.py) shards a block's tokens as the bidirectional forward does and asks one
function to attend the block's queries over everything the cache holds, the block itself included: this
module is that function and the cache it writes, per scheme. Nothing is ever re-gathered: under Ulysses a
rank caches all tokens of its H/U heads (a plain `KVCache`); under ring / hybrid it caches its own chunk of
every block (`RingKVCache`) and the ring passes the chunks around. Every rank returns what one process
would, up to float summation order (<= 1e-5 in fp32). ARCHITECTURE.md ("parallel") has the design.
"""
from __future__ import annotations

import math

import torch

from model.causal import CausalDiT, KVCache, LayerKV, SlotKV, cache_attention
from model.kernels import SDPA, AttentionKernel

from .attention import KVSegment, SequenceParallelLayout

__all__ = ["RingKVCache", "RingLayerKV", "CausalSequenceParallel", "attach"]


class RingLayerKV(SlotKV):
    """One layer's chunk buffers [B, slots x n, H/U, D]: this member's n tokens of each cached block."""

    label = "ring cache"
    unit_name = "block"

    @property
    def chunk(self) -> int:
        return self.unit

    @property
    def sink_units(self) -> int:
        return self.cache.sink_slots if self.cache.relative else 0

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this member's chunk [B, n, h, D] of the current block (post-RoPE k, raw v, padding included)."""
        c = self.cache
        if c.block is None:
            raise RuntimeError("ring cache: write before begin(); the block forward declares its frames first")
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"ring cache: k {tuple(k.shape)} / v {tuple(v.shape)} are not [B, n, H, D]")
        n = k.shape[1]
        self._ensure(k, c.slots, n)
        slot = c.block_slot(c.block[0] // c.block_frames)
        self.k[:, slot * n:(slot + 1) * n] = k
        self.v[:, slot * n:(slot + 1) * n] = v
        self.keep_sink(slot, 1)
        self.place_sink()  # a rotation by a constant shift: the same for every token of a member's chunk

    def segments(self, length: int) -> list[KVSegment]:
        """The K/V this member contributes to the ring for the current block (`RingKVCache.visible_runs`)."""
        n = self.chunk
        return [KVSegment(self.k[:, first * n:end * n], self.v[:, first * n:end * n], key_mask=mask)
                for first, end, mask in self.cache.visible_runs(length, n, self.k.device)]


class RingKVCache(KVCache):
    """One ring member's chunk of every cached block, in block slots; frames evicted by key masks.

    Slots: without a window, block b in slot b (grows like `KVCache`). With window W and sink S (frames) and
    blocks of F frames: ceil(S/F) sink slots holding blocks 0.. for ever, and ceil((W-S)/F) slots as a ring
    over the most recent blocks — enough for every block that still has a visible frame, since a block's
    slot is reused only once all its frames have left the window. Visibility is `KVCache`'s: frame j is seen
    by the block ending at `end` iff j < end and (no window, or j < S, or j >= first_frame).
    """

    def __init__(self, num_layers: int, window: int | None, sink: int, block_frames: int, member: int, members: int,
                 positions: str = "relative"):
        if block_frames < 1 or not 0 <= member < members:
            raise ValueError(f"ring cache: block_frames = {block_frames}, member {member} of {members}")
        self.block_frames, self.member, self.members = block_frames, member, members
        if window is not None:
            self.sink_slots = math.ceil(sink / block_frames)
            self.recent_slots = math.ceil((window - sink) / block_frames)
            self.slots = self.sink_slots + self.recent_slots
        else:
            self.sink_slots, self.recent_slots, self.slots = 0, 0, 0
        self._visible_key: tuple | None = None
        self._visible: list | None = None
        super().__init__(num_layers, window, sink, positions)

    layer_cls = RingLayerKV
    batches = False  # each member holds its chunk of every block: a batch would shard the blocks together

    # ---- geometry --------------------------------------------------------------------------------
    def block_slot(self, block: int) -> int:
        if self.window is None or block < self.sink_slots:
            return block
        return self.sink_slots + (block - self.sink_slots) % self.recent_slots

    def reserve(self, frames: int) -> None:
        if self.window is None:
            self.slots = max(self.slots, math.ceil(frames / self.block_frames))

    def begin(self, start: int, frames: int, blocks: int = 1) -> None:
        if blocks != 1:
            raise ValueError("ring cache: one block per forward (each member caches its chunk of every block)")
        if frames != self.block_frames or start % self.block_frames:
            raise ValueError(f"ring cache: blocks of {self.block_frames} frames at multiples of {self.block_frames}; "
                             f"got {frames} frames at frame {start}")
        super().begin(start, frames)
        if self.window is None:
            self.slots = max(self.slots, self.end // self.block_frames)

    @property
    def written_blocks(self) -> int:
        return self.end // self.block_frames

    def visible_runs(self, length: int, chunk: int, device) -> list[tuple[int, int, torch.Tensor | None]]:
        """What the current block attends to: (first slot, end slot, key mask) per run of adjacent slots holding
        a block with a visible key (usually one run over every held slot). The mask is None when every key of
        the run is visible, else bool over the run's segment-global index — member m's keys are
        [m·len, (m+1)·len) with len = (end - first)·chunk, `KVSegment`'s convention — False for padding and
        evicted frames. The same on every rank (block bookkeeping only); made once per block, for all layers."""
        key = (self.end, self.block, length, chunk, str(device))
        if self._visible_key == key:
            return self._visible
        runs: list[list[tuple[int, torch.Tensor | None]]] = []
        for slot, mask in self.visible_slots(length, chunk):
            if runs and runs[-1][-1][0] + 1 == slot:
                runs[-1].append((slot, mask))
            else:
                runs.append([(slot, mask)])
        out = []
        for run in runs:
            mask = None
            if any(m is not None for _, m in run):
                full = torch.ones(self.members, chunk, dtype=torch.bool)
                mask = torch.stack([full if m is None else m for _, m in run], dim=1).reshape(-1).to(device)
            out.append((run[0][0], run[-1][0] + 1, mask))
        self._visible_key, self._visible = key, out
        return out

    def visible_slots(self, length: int, chunk: int) -> list[tuple[int, torch.Tensor | None]]:
        """(slot, mask) for every held block with a visible key, in slot order; mask: bool [members, chunk] over
        each member's chunk of that block (True = attend), None when every key of the block is visible.
        length: tokens of one block (L); chunk: tokens per member (n; members·n = Lp >= L)."""
        bf = self.block_frames
        frame_tokens = length // bf
        padded = self.members * chunk
        tok = torch.arange(padded)
        out = []
        recent = range(self.written_blocks) if self.window is None else range(
            max(self.sink_slots, self.first_frame // bf), self.written_blocks)
        for b in [*range(min(self.sink_slots, self.written_blocks)), *recent]:  # O(window), not O(video)
            frames = [b * bf + j for j in range(bf)]
            seen = [f < self.end and (self.window is None or f < self.sink or f >= self.first_frame) for f in frames]
            if not any(seen):
                continue  # every frame of the block evicted: its slot holds a newer block now
            if all(seen) and padded == length:
                out.append((self.block_slot(b), None))
                continue
            frame_seen = torch.tensor(seen + [False])  # index bf: the padding rows
            mask = frame_seen[torch.clamp(tok // frame_tokens, max=bf)] & (tok < length)
            out.append((self.block_slot(b), mask.view(self.members, chunk)))
        out.sort(key=lambda item: item[0])
        return out




class CausalSequenceParallel:
    """The cache attention and the cache type of one rank under a `SequenceParallelLayout`.

    `attend(q, k, v, layer)` gets this rank's chunk [B, s, H, D] of the block's queries, keys (post-RoPE) and
    values and returns its chunk of the attention output; `new_cache(...)` makes the matching cache. The
    layout's `length` (set by `shard` in the block forward) is the block's unpadded token count.
    """

    def __init__(self, layout: SequenceParallelLayout):
        self.layout = layout
        self.attn = layout.attn
        self.ulysses, self.ring = layout.attn.ulysses.size, layout.attn.ring.size

    @property
    def scheme(self) -> str:
        if self.ring == 1:
            return "ulysses"
        return "ring" if self.ulysses == 1 else "hybrid"

    def new_cache(self, num_layers: int, window: int | None, sink: int, block_frames: int,
                  positions: str = "relative") -> KVCache:
        if self.ring == 1:
            return KVCache(num_layers, window, sink, positions)
        return RingKVCache(num_layers, window, sink, block_frames, self.attn.ring.rank, self.ring, positions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, kernel: AttentionKernel = SDPA) -> torch.Tensor:
        heads = q.shape[2]
        if heads % self.ulysses:
            raise ValueError(f"Ulysses degree {self.ulysses} must divide the number of attention heads ({heads})")
        length = self.layout.length
        if length is None:
            raise RuntimeError("causal SP attention before the layout sharded the block (its length is unknown)")
        q, k, v = self.attn.scatter_heads([q, k, v])  # [B, U*s, H/U, D]: ring member's chunk, this rank's heads
        if isinstance(layer, LayerKV):  # Ulysses: every token of the block is here; drop the padded rows
            out = cache_attention(q, k[:, :length], v[:, :length], layer, kernel)
        else:
            layer.write(k, v)
            out = self.attn.attend_scattered(q, layer.segments(length), kernel)
        return self.attn.gather_heads(out)


def attach(causal: CausalDiT, layout: SequenceParallelLayout | None) -> CausalDiT:
    """Run `causal` under `layout` (its DiT's layout must be it): the sharded attention and cache. None or a
    local layout: the one-process attention and cache."""
    from model.causal import local_cache

    if layout is None or not layout.sharded:
        return causal.use_attention(cache_attention, local_cache)
    if causal.dit.layout is not layout:
        raise ValueError("attach: set the DiT's layout to this SP layout first (dit.layout = layout)")
    sp = CausalSequenceParallel(layout)
    return causal.use_attention(sp.attend, sp.new_cache)
