"""CausVid: the Wan2.1 DiT run block-causally over a per-layer K/V cache, so a video can keep growing.

A CausVid-distilled Wan (LightX2V's CausVid class, CausVid, Self-Forcing) has exactly the parameters of
the base DiT (`WanModel`) but runs it differently: blocks of `num_frame_per_block` latent frames, each
denoised in a few steps while it attends to the cached K/V of every earlier frame. This module is that
model side: the cache (optionally windowed, with an attention sink), the block forward, and the
full-sequence forward under the block-causal mask it must equal. The loop over blocks, fragments and
sessions is model/causal_pipeline.py; the semantics, their upstream sources and the sequence-parallel seam
(`CausalDiT.attend` / `cache_factory`, parallel/causal.py): ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import Callable

import torch

from .kernels import SDPA, AttentionKernel
from .causal_mask import block_causal_mask, masked_attention
from .kvquant import Int8Tokens
from .dit import ROPE_MAX_POSITIONS, WanModel, apply_rope, rope_freqs, time_shift

__all__ = ["ROPE_MAX_POSITIONS", "KVCache", "SlotKV", "LayerKV", "cache_attention", "block_causal_mask", "CausalDiT",
           "tensor_bytes", "CacheFactory", "local_cache", "window_relative", "prefix_attention"]


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors of a (nested) list/tuple; other entries count 0."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(t) for t in tensors)
    return 0


# --------------------------------------------------------------------------------------------------
# The self-attention K/V cache
# --------------------------------------------------------------------------------------------------
class SlotKV:
    """K/V buffers [B, slots x unit, H, D] of one layer: `unit` tokens per slot (a frame here, a ring member's
    chunk of a block in parallel/causal.py), allocated from the first k written and grown keeping what is
    there. Subclasses write and read the slots."""

    label = "cache"  # error messages
    unit_name = "frame"

    def __init__(self, cache):
        self.cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.unit = 0
        self.k_sink: torch.Tensor | None = None  # relative positions: the sink's keys as written (never re-rotated)
        self._shift = 0  # the sink shift self.k's sink slots are rotated by

    @property
    def sink_units(self) -> int:
        """Leading slots that hold the sink and are re-positioned (0: the sink keeps its absolute positions)."""
        return 0

    def _ensure(self, k: torch.Tensor, slots: int, unit: int) -> None:
        shape = (k.shape[0], slots * unit, k.shape[2], k.shape[3])
        if self.k is not None:
            if (self.k.shape[0], self.k.shape[2], self.k.shape[3], self.unit) != (shape[0], shape[2], shape[3], unit):
                raise ValueError(f"{self.label}: block k {tuple(k.shape)} does not match the cache's geometry "
                                 f"(B, H, D = {self.k.shape[0]}, {self.k.shape[2]}, {self.k.shape[3]}; {self.unit} "
                                 f"tokens per {self.unit_name}); one cache per video size")
            if self.k.dtype != k.dtype or self.k.device != k.device:
                raise ValueError(f"{self.label}: holds {self.k.dtype} on {self.k.device}, the block is {k.dtype} on "
                                 f"{k.device}; move the session with .to() first")
            if self.k.shape[1] >= shape[1]:
                return
        # zeros: a restore's replay may attend to slots of frames it skipped (KVCache.skip_to)
        if self.cache.quant == "int8":
            new_k, new_v = Int8Tokens(shape, k.dtype, k.device), Int8Tokens(shape, k.dtype, k.device)
        else:
            new_k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            new_v = torch.zeros(shape, dtype=k.dtype, device=k.device)
        if self.k is not None:  # grow: keep what is there
            n = self.k.shape[1]
            for new, old in ((new_k, self.k), (new_v, self.v)):
                if isinstance(old, Int8Tokens):
                    new.q[:, :n], new.scale[:, :n] = old.q, old.scale
                else:
                    new[:, :n] = old
        self.k, self.v, self.unit = new_k, new_v, unit

    def keep_sink(self, first_slot: int, slots: int) -> None:
        """After a write of slots [first_slot, first_slot + slots): keep the sink's part as written. Sink slots are
        written only while the window has not moved (sink_shift 0), so these are the keys at their own positions."""
        n, u = self.sink_units, self.unit
        end = min(first_slot + slots, n)
        if first_slot >= end:
            return
        if self.k_sink is None or self.k_sink.shape[0] != self.k.shape[0]:
            self.k_sink = torch.zeros((self.k.shape[0], n * u, *self.k.shape[2:]), dtype=self.k.dtype,
                                      device=self.k.device)
        self.k_sink[:, first_slot * u:end * u] = self.k[:, first_slot * u:end * u]

    def place_sink(self) -> None:
        """Rotate the sink's keys to sit just before the window (`KVCache.sink_shift`): once per block, from the
        keys as written (so no rounding accumulates), for the S sink frames only."""
        shift = self.cache.sink_shift
        if shift == self._shift or self.k_sink is None:
            return
        n = self.k_sink.shape[1]
        if shift == 0:
            self.k[:, :n] = self.k_sink
        else:
            self.k[:, :n] = apply_rope(self.k_sink, self.cache.shift_rows(self.k.shape[3], self.k.device))
        self._shift = shift

    def nbytes(self) -> int:
        return sum(t.nbytes() if isinstance(t, Int8Tokens) else tensor_bytes(t) for t in (self.k, self.v, self.k_sink))

    def to(self, device: str | torch.device, copy: bool = False) -> None:
        if self.k is not None:
            self.k, self.v = self.k.to(device, copy=copy), self.v.to(device, copy=copy)
        if self.k_sink is not None:
            self.k_sink = self.k_sink.to(device, copy=copy)

    def free(self) -> None:
        self.k = self.v = self.k_sink = None
        self._shift = 0


class LayerKV(SlotKV):
    """One layer's K/V buffers [B, capacity x tokens_per_frame, H, D], allocated from the first k written."""

    @property
    def frame_tokens(self) -> int:
        return self.unit

    @property
    def sink_units(self) -> int:
        return self.cache.sink if self.cache.relative else 0

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the current block's post-RoPE k and raw v ([B, block tokens, H, D]) in its slots."""
        c = self.cache
        if c.block is None:
            raise RuntimeError("cache: write before begin(); the block forward declares its frames first")
        start, frames = c.block
        if k.shape != v.shape or k.dim() != 4 or k.shape[1] % frames:
            raise ValueError(f"cache: k {tuple(k.shape)} / v {tuple(v.shape)} are not [B, tokens, H, D] with "
                             f"tokens a multiple of the block's {frames} frames")
        ft = k.shape[1] // frames
        self._ensure(k, c.capacity, ft)
        for slot, j, n in c.runs(start, frames):
            self.k[:, slot * ft:(slot + n) * ft] = k[:, j * ft:(j + n) * ft]
            self.v[:, slot * ft:(slot + n) * ft] = v[:, j * ft:(j + n) * ft]
            if slot < self.sink_units:
                self.keep_sink(slot, n)
        self.place_sink()

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached key/value a query of the current block sees (slot order; attention ignores order)."""
        n = self.cache.held * self.frame_tokens
        return self.k[:, :n], self.v[:, :n]


def window_relative(window: int | None, positions: str) -> bool:
    """Are positions window-relative, so without an end? (`rope_positions` "relative" with a window; else they end
    at RoPE's table.)"""
    return positions == "relative" and window is not None


class KVCache:
    """The self-attention K/V of one video, for every layer, in frame-granular slots.

    Frames are cache positions counted from the last `reset()` (also the RoPE position the pipeline gives a block).
    `begin(start, frames)` declares the block the next forward writes: either the current block again (another
    denoising step, or the clean pass) or the block right after it. Each layer's `LayerKV` then writes and reads
    accordingly.

    window=None: every frame is kept; the buffers grow to `reserve()`d capacity (reallocated and copied, so
    reserve a whole fragment at once). window=W: the buffers hold W frames, allocated once; frames [0, sink) are
    never evicted, the other W - sink slots are a ring over the most recent frames: evicting moves no memory.

    positions="relative" (with a window): attention sees window-relative temporal positions, the sink just before
    the window. Keys are cached rotated at their own frame and never touched again (RoPE is relative: q·k depends
    on the position difference only, so the window attends as if re-indexed from 0); queries are rotated at their
    frame however far it is (RoPE rows past the table computed from their float64 angles); the sink's keys are
    re-rotated by `sink_shift` once per block from a copy kept as written. Cost: S sink frames rotated per block
    and per layer, and their K kept twice. "absolute": the sink keeps its own positions (Self-Forcing), and
    positions end at RoPE's table.
    """

    layer_cls = LayerKV  # the ring cache (parallel/causal.py) brings its own
    batches = True  # can one forward write several blocks (`begin(..., blocks)`)? The ring cache cannot

    def __init__(self, num_layers: int, window: int | None = None, sink: int = 0, positions: str = "relative"):
        if window is not None and (window < 1 or not 0 <= sink < window):
            raise ValueError(f"window = {window}, sink = {sink}: need window >= 1 and 0 <= sink < window")
        if window is None and sink:
            raise ValueError(f"sink = {sink}: a sink only means something with a window (nothing is evicted without)")
        if positions not in ("relative", "absolute"):
            raise ValueError(f"positions = {positions!r}: 'relative' or 'absolute'")
        self.window, self.sink = window, sink
        self.relative = window_relative(window, positions)
        self.quant = "none"  # "int8": per-group int8 K/V (model/kvquant.py), set before the first write
        self.layers = [self.layer_cls(self) for _ in range(num_layers)]
        self.capacity = window or 0  # frames the buffers hold
        self._shift_rows: tuple | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every frame. Buffers are kept (nothing stale is ever read: reads stop at `held`)."""
        self.end = 0  # frames [0, end) have been written
        self.block: tuple[int, int] | None = None  # (start, frames) of the block being written
        self.block_count = 1  # blocks in that write (> 1: a batched clean pass, `can_batch`)

    @property
    def bounded(self) -> bool:
        """Do positions end at RoPE's table? (Everything but a relative window.)"""
        return not self.relative

    @property
    def sink_shift(self) -> int:
        """Frames the sink is moved forward so it sits just before the window (relative positions; else 0)."""
        return self.first_frame - self.sink if self.relative and self.sink else 0

    def shift_rows(self, head_dim: int, device) -> torch.Tensor:
        """The rotation by `sink_shift` frames (made once per block, shared by the layers)."""
        key = (self.sink_shift, head_dim, str(device))
        if self._shift_rows is None or self._shift_rows[0] != key:
            self._shift_rows = (key, time_shift(head_dim, self.sink_shift).to(device))
        return self._shift_rows[1]

    # ---- geometry --------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Frames a query attends to (the cached frames, the current block included)."""
        return self.end if self.window is None else min(self.end, self.window)

    @property
    def first_frame(self) -> int:
        """Absolute index of the oldest frame held outside the sink."""
        return 0 if self.window is None else max(self.sink, self.end - (self.window - self.sink))

    def slot(self, frame: int) -> int:
        if self.window is None or frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % (self.window - self.sink)

    def runs(self, start: int, frames: int) -> list[tuple[int, int, int]]:
        """(first slot, first frame offset in the block, frames) for the contiguous slot runs of a block."""
        out: list[tuple[int, int, int]] = []
        for j in range(frames):
            s = self.slot(start + j)
            if out and out[-1][0] + out[-1][2] == s:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((s, j, 1))
        return out

    def skip_to(self, frame: int) -> None:
        """Declare frames [end, frame) written without writing them (a restore replays only the frames the cache
        still depends on): their slots read as zeros, and every block the restore replays sees what it saw the first
        time once the skipped frames are out of reach (model/causal_session.py). Fresh caches only: nothing but
        sink frames written so far, so those slots were never written."""
        if self.block is not None and self.end > self.sink:
            raise ValueError(f"cache: skip_to on a cache holding frames up to {self.end}; only a fresh cache (sink "
                             "frames at most) can skip")
        if frame < self.end:
            raise ValueError(f"cache: skip_to frame {frame} is before frame {self.end}, already written")
        self.end, self.block = frame, None
        if self.window is None:
            self.capacity = max(self.capacity, self.end)

    def reserve(self, frames: int) -> None:
        """Grow an unwindowed cache to hold `frames` frames (a no-op with a window: its size is fixed)."""
        if self.window is None and frames > self.capacity:
            self.capacity = frames

    def can_batch(self, start: int, frames: int) -> bool:
        """Can the clean passes of frames [start, start + frames), consecutive blocks, run as one forward
        (`begin(start, frames, blocks)`)? Only while nothing is evicted before the last of them is written, so
        that each block sees every frame before its end, as block by block (the batch attends block by block over
        those prefixes, `cache_attention`): a window that holds them all, the sink not moved yet. Without a window
        never (the batch would be the whole video: activations of every frame at once)."""
        return self.batches and self.window is not None and start == self.end and start + frames <= self.window

    def begin(self, start: int, frames: int, blocks: int = 1) -> None:
        """The next forward writes frames [start, start+frames): the current block again, or the next one; or
        (blocks > 1) the next `blocks` blocks at once, clean passes only (`can_batch`)."""
        if blocks > 1:
            if not self.can_batch(start, frames):
                raise ValueError(f"cache: {blocks} blocks at once (frames [{start}, {start + frames})) need a window "
                                 f"that holds them all after frame {self.end}; window = {self.window}")
            self.block, self.end, self.block_count = (start, frames), start + frames, blocks
            return
        if self.block == (start, frames) and self.block_count == 1:
            return  # a further denoising step / the clean pass of the same block: overwrite its slots
        if start != self.end:
            where = (f"the current block starts at frame {self.block[0]}" if self.block
                     else f"frames [0, {self.end}) are declared" if self.end else "the cache is empty")
            raise ValueError(f"cache: a block at frame {start} neither rewrites the current block nor follows "
                             f"frame {self.end} ({where}); blocks must come in order")
        if self.window is not None and frames > self.window - self.sink:
            raise ValueError(f"cache: a block of {frames} frames does not fit a window of {self.window} frames "
                             f"with {self.sink} sink frames")
        self.block = (start, frames)
        self.block_count = 1
        self.end = start + frames
        if self.window is None:
            self.capacity = max(self.capacity, self.end)

    # ---- memory ----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def to(self, device: str | torch.device, copy: bool = False) -> "KVCache":
        """Move every layer's buffers; copy=True copies even to the same device (a fresh allocation)."""
        for layer in self.layers:
            layer.to(device, copy)
        return self




def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV,
                    kernel: AttentionKernel = SDPA) -> torch.Tensor:
    """The block's self-attention over the cache: write the block's k/v into `layer`, attend q over all of it.

    q, k: post-RoPE, v raw, [B, block tokens, H, D]. The sequence-parallel seam (ARCHITECTURE.md): a
    parallel layout swaps this function for one that shards the cache as it shards K/V.
    """
    layer.write(k, v)
    keys, values = layer.view()
    return prefix_attention(q, keys, values, layer.cache.block_count, k.shape[1], kernel)


def prefix_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: int, tokens: int,
                     kernel: AttentionKernel = SDPA) -> torch.Tensor:
    """The last `tokens` keys are `blocks` equal blocks, the queries' own, in order (a batched clean pass,
    `KVCache.can_batch`): block i's queries attend to the keys up to its end, as they would block by block. Rows
    of q past `tokens` (Ulysses' padding, discarded by the caller) attend to every key. One block: plain."""
    if blocks == 1:
        return kernel(q, keys, values)
    step, past = tokens // blocks, keys.shape[1] - tokens
    outs = [kernel(q[:, i * step:(i + 1) * step], keys[:, :past + (i + 1) * step], values[:, :past + (i + 1) * step])
            for i in range(blocks)]
    if q.shape[1] > tokens:
        outs.append(kernel(q[:, tokens:], keys, values))
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------------
# The causal DiT
# --------------------------------------------------------------------------------------------------
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LayerKV, AttentionKernel], torch.Tensor]
CacheFactory = Callable[[int, "int | None", int, int, str], KVCache]  # (layers, window, sink, block frames, positions)


def local_cache(num_layers: int, window: int | None, sink: int, block_frames: int, positions: str) -> KVCache:
    """The one-process cache (also what each Ulysses rank holds: all tokens, its heads)."""
    return KVCache(num_layers, window, sink, positions)


class CausalDiT:
    """A `WanModel` run block by block over a `KVCache` (inference), or whole under the block-causal mask.

    Holds no state of any video: caches belong to the caller (one per session), so one model serves many.
    block_frames, window, sink, positions, kv_quant: `num_frame_per_block`, `attention_window`, `sink_frames`,
    `rope_positions`, `kv_cache_quant` of the config.
    """

    def __init__(self, dit: WanModel, block_frames: int, window: int | None = None, sink: int = 0,
                 positions: str = "relative", kv_quant: str = "none"):
        if dit.arch.is_i2v:
            raise ValueError("CausVid runs text-to-video DiTs only (LightX2V ships T2V CausVid only); this DiT is i2v")
        if block_frames < 1:
            raise ValueError(f"block_frames = {block_frames}: must be >= 1")
        if window is not None and window < sink + block_frames:
            raise ValueError(f"window = {window}: must hold the sink ({sink}) and a block ({block_frames}) frames")
        if positions == "relative" and window is not None and sink % block_frames:
            raise ValueError(f"sink = {sink}: relative positions re-position the sink as whole blocks of "
                             f"{block_frames} frames")
        self.dit, self.block_frames, self.window, self.sink = dit, block_frames, window, sink
        self.positions, self.kv_quant = positions, kv_quant
        self.attend: AttendFn = cache_attention
        self.cache_factory: CacheFactory = local_cache
        self._freqs: tuple | None = None  # (grid, frame offset, device, layout, this rank's freqs) of the last block

    @property
    def arch(self):
        return self.dit.arch

    def use_attention(self, attend: AttendFn, cache_factory: CacheFactory) -> "CausalDiT":
        """Swap the cache attention and the cache type together (a sequence-parallel layout does both)."""
        self.attend, self.cache_factory = attend, cache_factory
        return self

    def new_cache(self) -> KVCache:
        cache = self.cache_factory(self.arch.num_layers, self.window, self.sink, self.block_frames, self.positions)
        cache.quant = self.kv_quant
        return cache

    def context_kv(self, context: torch.Tensor) -> list:
        """Per-layer cross-attention K/V of a text context [B, <=text_len, text_dim]: the per-prompt cache."""
        return self.dit.context_kv(self.dit.embed_context(context, None))

    def _rope(self, grid, frame_offset: int, device) -> torch.Tensor:
        """This rank's RoPE rows of a block: the whole block's rotations at its frame offset (past the table too: the
        caller has checked a bounded cache's end), sharded like the tokens (every rank rotates its tokens with their
        global positions). The steps of one block share it (LightX2V caches it per chunk too)."""
        layout = self.dit.layout
        key, cached = (grid, frame_offset, device, layout), self._freqs
        if cached is None or cached[0] != key:
            freqs = rope_freqs(self.dit.rope_tables(), grid, frame_offset, unbounded=True).to(device)
            cached = (key, layout.shard(freqs[None])[0])
            self._freqs = cached
        return cached[1]

    def forward_block(self, x: torch.Tensor, t: torch.Tensor, frame_start: int, cache: KVCache, context_kv: list,
                      output: bool = True, blocks: int = 1) -> torch.Tensor | None:
        """One block: x [B, C, f, H, W] latents at absolute latent frame `frame_start`, t [B] or [B, f].

        Writes the block's K/V into `cache` (overwriting the block's slots if it is the block being written)
        and returns the flow [B, C, f, H, W]; output=False skips the head (the clean cache-filling pass).
        blocks > 1: x is that many consecutive blocks, their clean passes in one forward (`KVCache.can_batch`;
        a re-cache primes a window so, in one forward instead of one per block).
        Under a sharded layout every rank of the SP group calls this together with the same x and t; each
        keeps its share of the K/V in its own `cache`, and each gets the whole flow back.
        """
        dit = self.dit
        layout = dit.layout
        if layout.sharded and self.attend is cache_attention:
            raise NotImplementedError("CausVid under sequence parallelism needs the sharded cache attention: attach it "
                                      "with parallel.causal.attach(causal, layout)")
        if x.dim() != 5:
            raise ValueError(f"block latents must be [B, C, f, H, W]; got {tuple(x.shape)}")
        f = x.shape[2]
        if blocks > 1 and (output or f != blocks * self.block_frames):
            raise ValueError(f"a batched pass is clean passes only (output=False) of {blocks} blocks of "
                             f"{self.block_frames} frames; got {f} frames, output={output}")
        if frame_start < 0 or (cache.bounded and frame_start + f > ROPE_MAX_POSITIONS):
            raise ValueError(f"block at latent frames [{frame_start}, {frame_start + f}): RoPE covers frames "
                             f"[0, {ROPE_MAX_POSITIONS}) only (without a window, or with absolute positions)")
        tokens, grid = dit.patchify(x)
        length = tokens.shape[1]
        freqs = self._rope(grid, frame_start, tokens.device)
        e, e0 = dit.time_embed(_per_frame(t, x.shape[0], f).to(tokens.device))
        e, e0 = dit.per_token(e, grid), dit.per_token(e0, grid)
        tokens = layout.shard(tokens)  # records the block's global length (the padding the attention masks)
        if e.shape[1] > 1:
            e, e0 = layout.shard(e), layout.shard(e0)
        cache.begin(frame_start, grid[0], blocks)
        for blk, kv, layer in zip(dit.blocks, context_kv, cache.layers, strict=True):
            tokens = blk(tokens, e0, freqs, kv, lambda q, k, v, kern, layer=layer: self.attend(q, k, v, layer, kern))
        if not output:
            return None
        out = layout.gather(dit.head(tokens, e).float(), length)
        return dit.unpatchify(out, grid)

    def forward_full(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The whole sequence in one forward under the block-causal mask (training; the cache's reference).

        x [B, C, F, H, W] from latent frame 0; t [B, F] per-frame timesteps (e.g. 0 for clean context,
        the step's t for noisy blocks); context [B, Lt, text_dim]. Memory: a dense [L, L] mask.
        """
        dit = self.dit
        if dit.layout.sharded:
            raise NotImplementedError("the block-causal full-sequence forward runs with the local layout only")
        tokens, grid = dit.patchify(x)
        f, h, w = grid
        freqs = rope_freqs(dit.rope_tables(), grid, 0).to(tokens.device)
        e, e0 = dit.time_embed(_per_frame(t, x.shape[0], f).to(tokens.device))
        e, e0 = dit.per_token(e, grid), dit.per_token(e0, grid)
        kv = self.context_kv(context)
        frame_mask = block_causal_mask(f, self.block_frames, self.window, self.sink)
        mask = frame_mask.repeat_interleave(h * w, 0).repeat_interleave(h * w, 1).to(tokens.device)
        for blk, blk_kv in zip(dit.blocks, kv):
            tokens = blk(tokens, e0, freqs, blk_kv, lambda q, k, v, kern: masked_attention(q, k, v, mask, kern))
        return dit.unpatchify(dit.head(tokens, e).float(), grid)


def _per_frame(t: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """t as [B, frames]: a scalar or [B] is one timestep for every frame."""
    t = torch.as_tensor(t)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() == 1:
        t = t[:, None].expand(-1, frames)
    if t.shape != (batch, frames):
        raise ValueError(f"timesteps must be a scalar, [B] or [B, frames] = [{batch}, {frames}]; got {tuple(t.shape)}")
    return t
