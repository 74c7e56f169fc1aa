"""A CausVid session: one growing video's caches, what a restore needs, and the generators of the blocks to come.

Kept apart from the pipeline because it is the state a server holds between calls: it can be cancelled
mid-fragment and resumed, moved to CPU while idle, and saved as a small state (`state_dict`) from which
`restore` rebuilds it bit for bit. A session's memory stays flat however long the video grows: decoded frames
leave with their fragment (the server writes them to disk), and latents stay only as far as the cache and the
streaming decoder still depend on them, which also bounds what a restore replays. What is reproduced and how:
ARCHITECTURE.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .causal import ROPE_MAX_POSITIONS, tensor_bytes
from .causal_state import STATE_FORMAT, check_state
from .pipeline import CancelFn, Cancelled, Progress, ProgressFn, RequestError, StageTimer, check_prompt
from .video import to_uint8, write_mp4


@dataclass
class BlockOutput:
    """One finished block, as handed to `on_block`."""

    fragment: int  # fragment index (0-based) the block belongs to
    block: int  # block index in the session (0-based)
    latent_start: int  # first latent frame of the block in the session's video
    frame_start: int  # first video frame of the block in the session's video
    video: torch.Tensor | None  # [3, T, H, W] float32 in [-1, 1], CPU: the block's decoded frames (None: no decoder)
    latents: torch.Tensor  # [z, f, h, w] float32, CPU


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


Op = tuple[int, int, int]  # a clean pass the cache holds: (session block, cache frame, prompt index)


class CausalSession:
    """One growing video: its caches, what a restore needs, and the generators of the blocks to come.

    Made by `CausVidPipeline.start_session` / `restore_session`. Sessions share the pipeline's model and
    nothing else, so any number can be open; the pipeline runs one call at a time (one thread).

    history=False (a server's session): the decoded frames of a fragment are kept until the next fragment starts
    (the caller has written them out by then), latents only as far as a restore needs. history=True (a script's
    bounded video): every block's latents and frames stay, for `latents()`, `video()` and `save()`.
    """

    def __init__(self, pipe, prompt: str, seed: int, height: int, width: int, history: bool = False):
        self.pipe = pipe  # the CausVidPipeline (model/causal_pipeline.py) that made it
        self.seed, self.height, self.width = seed, height, width
        self.history = history
        self.block_frames = pipe.cfg.num_frame_per_block
        self.device = pipe.device  # where the caches live (see to())
        self.prompt = prompt
        self.cache = pipe.causal.new_cache()  # self-attention K/V
        self._ctx_kv: list | None = None  # cross-attention K/V of self.prompt, per layer
        self._decoder = pipe.stream_decoder()  # None: a rank that decodes nothing (causal_pipeline.py)
        self._noise_gen = torch.Generator("cpu").manual_seed(seed)  # block noise
        self._step_gen = torch.Generator("cpu").manual_seed(seed + 1)  # fresh-noise re-noising
        self._prompts = [prompt]  # every prompt used, in order of first use
        self._ops: list[Op] = []  # the clean passes in the cache since its last reset, oldest first, as far as it
        #                           still depends on them (`_prune`)
        self._primed: tuple[int, int] | None = None  # cache frames [a, b) of _ops written in one forward (`_replay`)
        self._latents: dict[int, torch.Tensor] = {}  # session block -> clean latents [z, f, h, w], CPU float32
        self._frames: list[np.ndarray] = []  # decoded frames uint8 [T, H, W, 3] of blocks _frames_first.. (rank 0)
        self._frames_first = 0
        self._blocks = 0  # finished blocks
        self._fragment_first = 0  # first block of the fragment being made / last made
        self._recache = False  # a new prompt waits for its re-cache (prompt_switch = "recache")
        self.fragments = 0  # finished fragments
        self._partial = 0  # finished blocks of an interrupted fragment
        self._pos = 0  # cache frame (RoPE position) of the next block
        self.nfe = 0  # DiT forwards so far
        self.timings: dict[str, float] = {}  # of the last next_fragment call

    # ---- what the session holds ------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return self._blocks

    @property
    def partial_blocks(self) -> int:
        """Finished blocks of an interrupted (cancelled) fragment; the next `next_fragment` makes the rest."""
        return self._partial

    @property
    def latent_frames(self) -> int:
        return self.blocks * self.block_frames

    @property
    def frames(self) -> int:
        """Video frames so far: 1 + 4·(latent frames − 1) once there is a block (the streaming decoder's count;
        also right on ranks that decode nothing)."""
        return 1 + 4 * (self.latent_frames - 1) if self._blocks else 0

    @property
    def fragment_first_block(self) -> int:
        """Session index of the first block of the fragment being made, or of the last one finished, whose frames
        the session still has (a session restored mid-fragment has only the blocks made since)."""
        return max(self._fragment_first, self._frames_first)

    def _whole(self, what: str) -> None:
        if not self.history:
            raise RuntimeError(f"session.{what}: this session keeps no history (history=False: a server's session "
                               "keeps only what its next fragment and a restore need); start it with history=True, "
                               "or collect blocks with on_block")

    def latents(self) -> torch.Tensor:
        """[z, latent frames, h, w] float32, CPU: the whole video's latents (history=True)."""
        self._whole("latents()")
        z, h, w = self.pipe.arch.out_dim, self.height // 8, self.width // 8
        blocks = [self._latents[b] for b in sorted(self._latents)]
        return torch.cat(blocks, dim=1) if blocks else torch.zeros(z, 0, h, w)

    def video(self) -> np.ndarray:
        """Every frame so far, uint8 [T, H, W, 3] (history=True; kept as uint8: a quarter of float32, and what mp4
        takes)."""
        self._whole("video()")
        if not self._frames:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.concatenate(self._frames)

    def decoded_blocks(self, start: int = 0, end: int | None = None) -> list[np.ndarray]:
        """Decoded frames of blocks [start, end) (session block indices) of the current fragment (all of them with
        history=True), uint8 [T, H, W, 3] each. Safe to call from another thread while a fragment is generated:
        it sees the blocks finished so far."""
        first = self._frames_first
        if start < first:
            raise RequestError(f"block {start} has left the session's memory (it keeps blocks {first} on; history="
                               "False)")
        return list(self._frames[start - first:None if end is None else end - first])

    def save(self, path: str | Path) -> Path:
        return write_mp4(path, self.video(), fps=self.pipe.cfg.fps)

    def cache_bytes(self) -> int:
        """Self-attention K/V cache + cross-attention cache, in bytes (on `self.device`)."""
        return self.cache.nbytes() + tensor_bytes(self._ctx_kv)

    def memory_bytes(self) -> dict[str, int]:
        """Everything the session holds: caches and decoder state (on `self.device`), latents and frames (CPU)."""
        return {"kv_cache": self.cache.nbytes(), "cross_attention": tensor_bytes(self._ctx_kv),
                "decoder": tensor_bytes(self._decoder.state_tensors()) if self._decoder is not None else 0,
                "latents": tensor_bytes(list(self._latents.values())), "video": sum(f.nbytes for f in self._frames)}

    def to(self, device: str | torch.device, copy: bool = False) -> "CausalSession":
        """Move the caches and the decoder state (an idle session can wait in CPU memory); bit-exact.

        copy=True allocates fresh buffers even when `device` is where they are already (the idle tier on a
        CPU-only machine is then still a real copy, and the old buffers are freed when dropped)."""
        device = torch.device(device)
        self.cache.to(device, copy)
        if self._ctx_kv is not None:
            self._ctx_kv = [tuple(t.to(device, copy=copy) for t in kv) for kv in self._ctx_kv]
        if self._decoder is not None:
            self._decoder.to(device, copy)
        self.device = device
        return self

    def release(self) -> None:
        """Free the caches, the decoder state and the frames now (a closed session): the caches hold reference
        cycles (cache <-> layers), so dropping the session alone would leave them to the cyclic collector."""
        for layer in self.cache.layers:
            layer.free()
        self.cache.reset()
        self._ctx_kv = None
        if self._decoder is not None:
            self._decoder.clear()
        self._frames.clear()

    # ---- prompts -------------------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Use `prompt` from the next block on: the cross-attention cache is recomputed; with prompt_switch =
        "recache" (default) the frames the next block sees are re-cached under it first (`_recache_now`)."""
        prompt = check_prompt(prompt, self.pipe.cfg.max_prompt_chars)
        if prompt != self.prompt:
            self.prompt = prompt
            self._ctx_kv = None
            if prompt not in self._prompts:
                self._prompts.append(prompt)
            self._recache = self.pipe.cfg.prompt_switch == "recache" and bool(self._ops)

    def _context(self, progress: ProgressFn | None) -> list:
        if self._ctx_kv is None:
            self._ctx_kv = self.pipe.causal.context_kv(self.pipe.encode_prompt(self.prompt))
            if progress:
                progress(Progress("text", 1, 1))
        return self._ctx_kv

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def next_fragment(self, prompt: str | None = None, progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None,
                      on_block: Callable[[BlockOutput], None] | None = None) -> torch.Tensor:
        """Generate the next fragment (or the rest of an interrupted one); returns its frames [3, T, H, W] float32
        in [-1, 1] on CPU. Each block is decoded and handed to `on_block` as soon as it is finished.
        A session that decodes no frames (a rank > 0 under SP) denoises the same blocks and returns None."""
        pipe = self.pipe
        if not _same_device(self.device, pipe.device):
            raise RuntimeError(f"session caches are on {self.device}; move them back with session.to("
                               f"'{pipe.device}') before generating")
        if prompt is not None:
            self.set_prompt(prompt)
        fragment, bf = self.fragments, self.block_frames
        todo = pipe.fragment_blocks(fragment) - self._partial
        anchor = fragment > 0 and self._partial == 0 and pipe.cfg.fragment_continuation == "last_block"
        recache = self._recache_ops(self._recache_plan()) if self._recache and not anchor else None
        first = bf if anchor else (len(recache[0]) * bf if recache is not None else self._pos)
        if self.cache.bounded and first + todo * bf > ROPE_MAX_POSITIONS:
            raise RequestError(f"this session is at latent frame {first}; fragment {fragment + 1} would need frames up "
                               f"to {first + todo * bf}, beyond RoPE's {ROPE_MAX_POSITIONS} positions (Wan's RoPE "
                               "table). Start a new session, or run with attention_window and rope_positions = "
                               "'relative' (no end), or fragment_continuation = 'last_block'")
        if self._partial == 0:
            self._fragment_first = self._blocks
            if not self.history:  # the previous fragment's frames have been handed out
                self._frames.clear()
                self._frames_first = self._blocks
        timer = StageTimer(pipe.device)
        t0 = time.perf_counter()
        total = todo * (len(pipe.sampler) + 1) + anchor + (len(self._passes(*recache)) if recache else 0)
        counter = [0, total]
        with timer("text"):
            ctx_kv = self._context(progress)
        if cancel and cancel():
            raise Cancelled("cancelled before the fragment started")
        if anchor:
            with timer("dit"):
                self._anchor(ctx_kv)
            self._count(counter, progress)
        self._recache = False
        if recache:
            t1 = time.perf_counter()
            with timer("dit"):
                self._replay(*recache, ctx_kv, counter, progress)
            timer.timings["recache"] = time.perf_counter() - t1
        self.cache.reserve(self._pos + todo * bf)
        outs = []
        for j in range(todo):
            states = self._noise_gen.get_state(), self._step_gen.get_state()
            try:
                with timer("dit"):
                    x0 = self._denoise_block(ctx_kv, counter, progress, cancel)
            except Cancelled:  # the retry redraws the same noise; the block's slots are rewritten
                self._noise_gen.set_state(states[0])
                self._step_gen.set_state(states[1])
                raise
            video = None
            if self._decoder is not None:
                with timer("vae"):
                    decoded = self._decoder.decode(x0)  # None on a rank > 0 of a split VAE (parallel/vae.py)
                video = decoded[0].cpu() if decoded is not None else None
            out = self._keep_block(fragment, x0[0].cpu(), video)
            outs.append(video)
            timer.timings.setdefault("first_block", time.perf_counter() - t0)
            if on_block:
                on_block(out)
            if progress:
                progress(Progress("vae", j + 1, todo))
            if cancel and j + 1 < todo and cancel():
                self.timings = timer.timings
                raise Cancelled(f"cancelled after block {j + 1} of {todo}")
        self._partial = 0
        self.fragments += 1
        timer.timings["total"] = time.perf_counter() - t0
        self.timings = timer.timings
        return None if any(v is None for v in outs) else torch.cat(outs, dim=1)

    def _count(self, counter: list[int], progress: ProgressFn | None) -> None:
        self.nfe += 1
        counter[0] += 1
        if progress:
            progress(Progress("dit", counter[0], counter[1]))

    def _denoise_block(self, ctx_kv: list, counter: list[int], progress: ProgressFn | None,
                       cancel: CancelFn | None) -> torch.Tensor:
        """Noise -> clean latents [1, z, f, h, w] for the block at self._pos, then its clean cache pass."""
        pipe, causal, sampler = self.pipe, self.pipe.causal, self.pipe.sampler
        shape = (1, pipe.arch.out_dim, self.block_frames, self.height // 8, self.width // 8)
        x = torch.randn(shape, generator=self._noise_gen, dtype=torch.float32).to(pipe.device)
        for i in range(len(sampler)):
            t = sampler.timesteps[i].reshape(1)
            flow = causal.forward_block(x, t, self._pos, self.cache, ctx_kv).float()
            x = sampler.step(i, flow, x, generator=self._step_gen)
            self._count(counter, progress)
            if cancel and cancel():
                raise Cancelled(f"cancelled at step {i + 1} of block {self.blocks + 1}")
        causal.forward_block(x, torch.zeros(1), self._pos, self.cache, ctx_kv, output=False)
        self._count(counter, progress)
        return x

    def _anchor(self, ctx_kv: list) -> None:
        """"last_block": restart the cache from the previous fragment's last block, clean, at frame 0."""
        self.cache.reset()
        last = self._blocks - 1
        self.pipe.causal.forward_block(self._latents[last][None].to(self.pipe.device), torch.zeros(1), 0, self.cache,
                                       ctx_kv, output=False)
        self._ops = [(last, 0, self._prompts.index(self.prompt))]
        self._primed = None
        self._pos = self.block_frames

    def _recache_plan(self) -> list[int]:
        """Blocks whose frames the next block sees (sink and window; every block without a window), oldest first."""
        w, sink, bf = self.cache.window, self.cache.sink, self.block_frames
        if w is None:
            return [b for b, _, _ in self._ops]
        lo = self._pos + bf - (w - sink)  # the next block's first visible frame outside the sink
        return [b for b, frame, _ in self._ops if frame < sink or frame + bf > lo]

    def _recache_ops(self, blocks: list[int]) -> tuple[list[Op], tuple[int, int] | None]:
        """The re-cache of `blocks` under the current prompt from cache frame 0: its clean passes, and the frames
        written in one forward (the blocks after the sink, when the cache batches; None: block by block). The sink
        is written alone, as block by block, so its K/V (seen for ever) never depend on how a batch was shaped."""
        p, bf, cache = self._prompts.index(self.prompt), self.block_frames, self.cache
        ops = [(b, i * bf, p) for i, b in enumerate(blocks)]
        start = next((frame for _, frame, _ in ops if frame >= cache.sink), None)
        batched = start is not None and len(ops) * bf - start > bf and cache.batches and cache.window is not None
        return ops, (start, len(ops) * bf) if batched else None

    def _replay(self, ops: list[Op], primed: tuple[int, int] | None, ctx_kv: list, counter: list[int],
                progress: ProgressFn | None) -> None:
        """LongLive's re-cache at a prompt switch: a fresh cache primed with the clean latents of `ops` under the
        current prompt (a new session primed with them, to float rounding where a batch ran), so the old prompt
        leaves the self-attention K/V too; positions restart at 0 (relative positions: the same attention). The
        frames after the sink run as one forward: a window's worth of clean passes for the price of about one."""
        self._ops, self._primed = ops, primed
        self._pos = len(ops) * self.block_frames
        self.cache.reset()
        for _ in self._clean_passes(self._ops, lambda _: ctx_kv):
            self._count(counter, progress)

    def _passes(self, ops: list[Op], primed: tuple[int, int] | None) -> list[list[Op]]:
        """`ops` grouped into the forwards that run them: the ops inside `primed` together, every other alone (all
        alone on a cache that cannot batch: a state from a Ulysses group restored on a ring, equal to float
        rounding)."""
        if not self.cache.batches:
            primed = None
        out: list[list[Op]] = []
        for op in ops:
            inside = primed is not None and primed[0] <= op[1] < primed[1]
            if inside and out and primed[0] <= out[-1][0][1] < primed[1]:
                out[-1].append(op)
            else:
                out.append([op])
        return out

    def _clean_passes(self, ops: list[Op], context: Callable[[int], list]):
        """Run the clean (t = 0) passes `ops` into the cache in order, as they first ran (`_primed` as one
        forward), prompt p's cross-attention K/V from `context(p)`; a gap before an op is declared with
        `KVCache.skip_to`. Yields after each forward."""
        causal, device = self.pipe.causal, self.pipe.device
        for run in self._passes(ops, self._primed):
            frame, p = run[0][1], run[0][2]
            if frame > self.cache.end:
                self.cache.skip_to(frame)
            x = torch.cat([self._latents[b] for b, _, _ in run], dim=1)[None].to(device)
            causal.forward_block(x, torch.zeros(1), frame, self.cache, context(p), output=False, blocks=len(run))
            yield

    def _keep_block(self, fragment: int, latents: torch.Tensor, video: torch.Tensor | None) -> BlockOutput:
        out = BlockOutput(fragment, self.blocks, self.latent_frames, self.frames, video, latents)
        self._latents[self._blocks] = latents
        self._ops.append((self._blocks, self._pos, self._prompts.index(self.prompt)))
        if video is not None:
            self._frames.append(to_uint8(video))
        self._blocks += 1
        self._pos += self.block_frames
        self._partial += 1
        self._prune()
        return out

    # ---- what a restore needs ----------------------------------------------------------------------
    def replay_horizon(self) -> int | None:
        """Cache frames back from the cache's end that its content still depends on (None: all, no window).

        A block's layer-l K/V depend on the layer-(l-1) K/V of the frames it saw, one window (W - S frames) back,
        and layer 0 on its own latents only: so after num_layers windows (and a block) the frames before are
        out of reach, except the sink, which every block sees and which depends on itself only. Replaying the
        clean passes of the frames in reach, into a fresh cache whose skipped slots are zeros, gives back the
        cache bit for bit (tested)."""
        c = self.cache
        if c.window is None:
            return None
        return self.pipe.arch.num_layers * (c.window - c.sink) + self.block_frames

    def _decoder_blocks(self) -> int:
        """Latest blocks the streaming decoder's state depends on (its history, in whole blocks; at least the last
        block, which "last_block" re-anchors on)."""
        frames = self._decoder.history_frames if self._decoder is not None else 1
        return max(1, -(-frames // self.block_frames))

    def _prune(self) -> None:
        if self.history:
            return
        horizon = self.replay_horizon()
        if horizon is not None:
            lo, sink, primed = self.cache.end - horizon, self.cache.sink, self._primed
            # a batched pass is replayed whole: its ops stay while its last one is in reach
            whole = primed is not None and primed[1] - self.block_frames >= lo
            self._ops = [op for op in self._ops
                         if op[1] < sink or op[1] >= lo or (whole and primed[0] <= op[1] < primed[1])]
            if not whole:
                self._primed = None
        keep = {b for b, _, _ in self._ops} | set(range(self._blocks - self._decoder_blocks(), self._blocks))
        for b in [b for b in self._latents if b not in keep]:
            del self._latents[b]

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What `restore` needs (CPU tensors and plain values; torch.save-able; bounded by the window, not by the
        video's length). No caches: they are rebuilt."""
        return {"format": STATE_FORMAT, "config": self.pipe.state_config(), "seed": self.seed,
                "height": self.height, "width": self.width, "prompt": self.prompt, "prompts": list(self._prompts),
                "ops": [list(op) for op in self._ops], "primed": list(self._primed) if self._primed else None,
                "blocks": self._blocks, "pos": self._pos,
                "recache": self._recache, "fragments": self.fragments, "partial": self._partial,
                "latents": {b: t.clone() for b, t in self._latents.items()},
                "decoder_blocks": self._decoder_blocks(),
                "noise_rng": self._noise_gen.get_state(), "step_rng": self._step_gen.get_state()}

    @classmethod
    def check_state(cls, pipe, state: Any) -> tuple[int, int, int]:
        """Everything `restore` can refuse, checked before it does any work (model/causal_state.py)."""
        return check_state(pipe, state)

    @classmethod
    @torch.no_grad()
    def restore(cls, pipe, state: dict[str, Any], progress: ProgressFn | None = None,
                history: bool = False) -> "CausalSession":
        """Rebuild a session from `state_dict()`: the streaming decoder from its latest blocks, the cache by
        replaying the clean passes it still depends on (`replay_horizon`). Both are bounded by the window, not by
        the video's length; the next fragment equals the uninterrupted one bit for bit. The video so far is not
        decoded again: it was handed out fragment by fragment (the server keeps it on disk)."""
        seed, height, width = cls.check_state(pipe, state)
        s = cls(pipe, state["prompt"], seed, height, width, history=history)
        s._prompts = list(state["prompts"])
        s._ops = [tuple(int(x) for x in op) for op in state["ops"]]
        s._primed = tuple(int(x) for x in state["primed"]) if state.get("primed") is not None else None
        s._latents = {int(b): t.float().clone() for b, t in state["latents"].items()}
        s._blocks, s._pos, s._recache = int(state["blocks"]), int(state["pos"]), bool(state["recache"])
        s.fragments, s._partial = int(state["fragments"]), int(state["partial"])
        s._frames_first = s._blocks
        s._fragment_first = s._blocks - s._partial
        s._noise_gen.set_state(state["noise_rng"])
        s._step_gen.set_state(state["step_rng"])
        if s._decoder is not None and s._blocks:
            first = max(0, s._blocks - int(state["decoder_blocks"]))
            tail = torch.cat([s._latents[b] for b in range(first, s._blocks)], dim=1)
            s._decoder.resume(tail[None].to(pipe.device), first * s.block_frames)
            if progress:
                progress(Progress("vae", 1, 1))
        s._rebuild_cache(progress)
        return s

    def _rebuild_cache(self, progress: ProgressFn | None = None) -> None:
        """Re-run the clean passes the cache holds (`_ops`), in order, each under its own prompt, exactly as they
        first ran; frames pruned before them are skipped (`KVCache.skip_to`). Nothing at a "last_block" fragment
        boundary: the next fragment re-anchors anyway."""
        last_block_boundary = self.pipe.cfg.fragment_continuation == "last_block" and self._partial == 0
        plan = [] if last_block_boundary else self._ops
        self.cache.reset()
        self.cache.reserve(self._pos)
        contexts: dict[int, list] = {}

        def context(p: int) -> list:
            if p not in contexts:
                contexts[p] = self.pipe.causal.context_kv(self.pipe.encode_prompt(self._prompts[p]))
            return contexts[p]

        passes = len(self._passes(plan, self._primed))
        for i, _ in enumerate(self._clean_passes(plan, context)):
            self.nfe += 1
            if progress:
                progress(Progress("dit", i + 1, passes))
        if plan and self._pos > self.cache.end:
            raise ValueError(f"session state: its cache ends at frame {self.cache.end}, the next block is at "
                             f"{self._pos}")
        self._ctx_kv = contexts.get(self._prompts.index(self.prompt))

    def __repr__(self) -> str:
        return (f"CausalSession(seed={self.seed}, {self.height}x{self.width}, fragments={self.fragments}, "
                f"blocks={self.blocks}, frames={self.frames}, cache={self.cache_bytes()} B on {self.device})")
