"""A CausVid session: one growing video's caches, its blocks so far and the generators of the blocks to come.

Kept apart from the pipeline because it is the state a server holds between calls: it can be cancelled
mid-fragment and resumed, moved to CPU while idle, and saved as a small state (`state_dict`) from which
`restore` rebuilds it bit for bit (caches re-run, not stored). What is reproduced and how: ARCHITECTURE.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .causal import ROPE_MAX_POSITIONS, tensor_bytes
from .pipeline import CancelFn, Cancelled, Progress, ProgressFn, RequestError, StageTimer, check_prompt
from .video import to_uint8, write_mp4

STATE_FORMAT = "wanserve.causvid.session/1"


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


class CausalSession:
    """One growing video: its caches, its blocks so far, and the generators of the blocks to come.

    Made by `CausVidPipeline.start_session` / `restore_session`. Sessions share the pipeline's model and
    nothing else, so any number can be open; the pipeline runs one call at a time (one thread).
    """

    def __init__(self, pipe, prompt: str, seed: int, height: int, width: int):
        self.pipe = pipe  # the CausVidPipeline (model/causal_pipeline.py) that made it
        self.seed, self.height, self.width = seed, height, width
        self.block_frames = pipe.cfg.num_frame_per_block
        self.device = pipe.device  # where the caches live (see to())
        self.prompt = prompt
        self.cache = pipe.causal.new_cache()  # self-attention K/V
        self._ctx_kv: list | None = None  # cross-attention K/V of self.prompt, per layer
        self._decoder = pipe.vae.stream_decoder() if pipe.vae is not None else None  # None: a rank > 0 of an SP group
        self._noise_gen = torch.Generator("cpu").manual_seed(seed)  # block noise
        self._step_gen = torch.Generator("cpu").manual_seed(seed + 1)  # fresh-noise re-noising
        self._prompts = [prompt]  # every prompt used, in order of first use
        self._block_prompt: list[int] = []  # per finished block: index into _prompts
        self._anchor_prompt: int | None = None  # "last_block": prompt of the current fragment's re-anchor pass
        self._latents: list[torch.Tensor] = []  # per finished block: clean latents [z, f, h, w], CPU float32
        self._frames: list[np.ndarray] = []  # per finished block: decoded frames uint8 [T, H, W, 3] (decoding ranks)
        self.fragments = 0  # finished fragments
        self._partial = 0  # finished blocks of an interrupted fragment
        self._pos = 0  # RoPE frame of the next block
        self.nfe = 0  # DiT forwards so far
        self.timings: dict[str, float] = {}  # of the last next_fragment call

    # ---- what the session holds ------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return len(self._latents)

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
        return 1 + 4 * (self.latent_frames - 1) if self._latents else 0

    def latents(self) -> torch.Tensor:
        """[z, latent frames, h, w] float32, CPU."""
        z, h, w = self.pipe.arch.out_dim, self.height // 8, self.width // 8
        return torch.cat(self._latents, dim=1) if self._latents else torch.zeros(z, 0, h, w)

    def video(self) -> np.ndarray:
        """Every frame so far, uint8 [T, H, W, 3] (kept as uint8: a quarter of float32, and what mp4 takes)."""
        if not self._frames:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.concatenate(self._frames)

    def decoded_blocks(self, start: int = 0, end: int | None = None) -> list[np.ndarray]:
        """Decoded frames of blocks [start, end) (session block indices), uint8 [T, H, W, 3] each. Safe to call
        from another thread while a fragment is generated: it sees the blocks finished so far."""
        return list(self._frames[start:end])

    def save(self, path: str | Path) -> Path:
        return write_mp4(path, self.video(), fps=self.pipe.cfg.fps)

    def cache_bytes(self) -> int:
        """Self-attention K/V cache + cross-attention cache, in bytes (on `self.device`)."""
        return self.cache.nbytes() + tensor_bytes(self._ctx_kv)

    def memory_bytes(self) -> dict[str, int]:
        """Everything the session holds: caches and decoder state (on `self.device`), latents and frames (CPU)."""
        return {"kv_cache": self.cache.nbytes(), "cross_attention": tensor_bytes(self._ctx_kv),
                "decoder": tensor_bytes(self._decoder.feat_cache) if self._decoder is not None else 0,
                "latents": tensor_bytes(self._latents), "video": sum(f.nbytes for f in self._frames)}

    def to(self, device: str | torch.device, copy: bool = False) -> "CausalSession":
        """Move the caches and the decoder state (an idle session can wait in CPU memory); bit-exact.

        copy=True allocates fresh buffers even when `device` is where they are already (the idle tier on a
        CPU-only machine is then still a real copy, and the old buffers are freed when dropped)."""
        device = torch.device(device)
        self.cache.to(device, copy)
        if self._ctx_kv is not None:
            self._ctx_kv = [tuple(t.to(device, copy=copy) for t in kv) for kv in self._ctx_kv]
        if self._decoder is not None:
            self._decoder.feat_cache = [t.to(device, copy=copy) if isinstance(t, torch.Tensor) else t
                                        for t in self._decoder.feat_cache]
        self.device = device
        return self

    def release(self) -> None:
        """Free the caches, the decoder state and the frames now (a closed session): the caches hold reference
        cycles (cache <-> layers), so dropping the session alone would leave them to the cyclic collector."""
        for layer in self.cache.layers:
            layer.k = layer.v = None
        self.cache.reset()
        self._ctx_kv = None
        if self._decoder is not None:
            self._decoder.feat_cache = [None] * len(self._decoder.feat_cache)
        self._frames.clear()

    # ---- prompts -------------------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Use `prompt` from the next block on: the cross-attention cache is recomputed, the K/V cache kept."""
        prompt = check_prompt(prompt, self.pipe.cfg.max_prompt_chars)
        if prompt != self.prompt:
            self.prompt = prompt
            self._ctx_kv = None
            if prompt not in self._prompts:
                self._prompts.append(prompt)

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
        A session without a decoder (a rank > 0 under SP) denoises the same blocks and returns None."""
        pipe = self.pipe
        if not _same_device(self.device, pipe.device):
            raise RuntimeError(f"session caches are on {self.device}; move them back with session.to("
                               f"'{pipe.device}') before generating")
        if prompt is not None:
            self.set_prompt(prompt)
        fragment, bf = self.fragments, self.block_frames
        todo = pipe.fragment_blocks(fragment) - self._partial
        anchor = fragment > 0 and self._partial == 0 and pipe.cfg.fragment_continuation == "last_block"
        first = bf if anchor else self._pos
        if first + todo * bf > ROPE_MAX_POSITIONS:
            raise RequestError(f"this session is at latent frame {first}; fragment {fragment + 1} would need frames up "
                               f"to {first + todo * bf}, beyond RoPE's {ROPE_MAX_POSITIONS} positions (Wan's RoPE "
                               "table). Start a new session, or run with fragment_continuation = 'last_block'")
        timer = StageTimer(pipe.device)
        t0 = time.perf_counter()
        total = todo * (len(pipe.sampler) + 1) + anchor
        counter = [0, total]
        with timer("text"):
            ctx_kv = self._context(progress)
        if cancel and cancel():
            raise Cancelled("cancelled before the fragment started")
        if anchor:
            with timer("dit"):
                self._anchor(ctx_kv)
            self._count(counter, progress)
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
                    video = self._decoder.decode(x0)[0].cpu()
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
        return torch.cat(outs, dim=1) if self._decoder is not None else None

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
        last = self._latents[-1][None].to(self.pipe.device)
        self.pipe.causal.forward_block(last, torch.zeros(1), 0, self.cache, ctx_kv, output=False)
        self._anchor_prompt = self._prompts.index(self.prompt)
        self._pos = self.block_frames

    def _keep_block(self, fragment: int, latents: torch.Tensor, video: torch.Tensor | None) -> BlockOutput:
        out = BlockOutput(fragment, self.blocks, self.latent_frames, self.frames, video, latents)
        self._latents.append(latents)
        if video is not None:
            self._frames.append(to_uint8(video))
        self._block_prompt.append(self._prompts.index(self.prompt))
        self._pos += self.block_frames
        self._partial += 1
        return out

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What `restore` needs (CPU tensors and plain values; torch.save-able). No caches: they are rebuilt."""
        return {"format": STATE_FORMAT, "config": self.pipe.state_config(), "seed": self.seed,
                "height": self.height, "width": self.width, "prompt": self.prompt, "prompts": list(self._prompts),
                "block_prompt": list(self._block_prompt), "anchor_prompt": self._anchor_prompt,
                "fragments": self.fragments, "partial": self._partial, "latents": self.latents().clone(),
                "noise_rng": self._noise_gen.get_state(), "step_rng": self._step_gen.get_state()}

    @classmethod
    def check_state(cls, pipe, state: Any) -> tuple[int, int, int]:
        """Everything `restore` can refuse, checked before it does any work (a ValueError saying why).

        Returns the state's (seed, height, width). A parallel group checks on every rank before the collective
        replay, so a bad state is refused everywhere alike and the group stays usable."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a CausVid session state (format {STATE_FORMAT!r} expected)")
        missing = sorted({"config", "seed", "height", "width", "prompt", "prompts", "block_prompt", "anchor_prompt",
                          "fragments", "partial", "latents", "noise_rng", "step_rng"} - set(state))
        if missing:
            raise ValueError(f"session state lacks {', '.join(missing)}")
        want = pipe.state_config()
        diff = sorted(k for k in set(want) | set(state["config"]) if want.get(k) != state["config"].get(k))
        if diff:
            raise ValueError(f"session state was made with other settings ({', '.join(diff)}) than this pipeline's; "
                             "it cannot be reproduced here")
        seed, height, width = pipe.check_request(int(state["seed"]), int(state["height"]), int(state["width"]))
        check_prompt(state["prompt"], pipe.cfg.max_prompt_chars)
        n = len(state["block_prompt"])
        shape = (pipe.arch.out_dim, n * pipe.cfg.num_frame_per_block, height // 8, width // 8)
        lat = state["latents"]
        if not isinstance(lat, torch.Tensor) or tuple(lat.shape) != shape:
            got = tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__
            raise ValueError(f"session state latents {got} do not match its {n} blocks at {height}x{width}: "
                             f"expected {shape}")
        if any(not 0 <= p < len(state["prompts"]) for p in state["block_prompt"]):
            raise ValueError("session state: a block refers to a prompt it does not list")
        return seed, height, width

    @classmethod
    @torch.no_grad()
    def restore(cls, pipe, state: dict[str, Any],
                progress: ProgressFn | None = None) -> "CausalSession":
        """Rebuild a session from `state_dict()` (what is reproduced, and at what cost: ARCHITECTURE.md, CausVid)."""
        seed, height, width = cls.check_state(pipe, state)
        s = cls(pipe, state["prompt"], seed, height, width)
        lat = state["latents"]
        n = len(state["block_prompt"])
        s._prompts, s._block_prompt = list(state["prompts"]), list(state["block_prompt"])
        s._anchor_prompt = state["anchor_prompt"]
        s.fragments, s._partial = int(state["fragments"]), int(state["partial"])
        s._noise_gen.set_state(state["noise_rng"])
        s._step_gen.set_state(state["step_rng"])
        for b, block in enumerate(lat.float().split(s.block_frames, dim=1)):
            s._latents.append(block.clone())
            if s._decoder is not None:
                s._frames.append(to_uint8(s._decoder.decode(block[None].to(pipe.device))[0]))
                if progress:
                    progress(Progress("vae", b + 1, n))
        s._rebuild_cache(progress)
        return s

    def _rebuild_cache(self, progress: ProgressFn | None = None) -> None:
        """Re-run the clean pass of every block the cache depends on, in order (exactly as they first ran)."""
        bf, causal = self.block_frames, self.pipe.causal
        if self.pipe.cfg.fragment_continuation == "cache":
            plan = [(b, b * bf, self._block_prompt[b]) for b in range(self.blocks)]
            self._pos = self.blocks * bf
        elif self._partial == 0:  # at a fragment boundary the next fragment re-anchors anyway
            plan, self._pos = [], 0
        else:
            first = self.blocks - self._partial
            base = bf if self.fragments > 0 else 0
            plan = [(first - 1, 0, self._anchor_prompt)] if self.fragments > 0 else []
            plan += [(first + j, base + j * bf, self._block_prompt[first + j]) for j in range(self._partial)]
            self._pos = base + self._partial * bf
        self.cache.reset()
        self.cache.reserve(self._pos)
        contexts: dict[int, list] = {}
        for i, (b, pos, p) in enumerate(plan):
            if p not in contexts:
                contexts[p] = causal.context_kv(self.pipe.encode_prompt(self._prompts[p]))
            causal.forward_block(self._latents[b][None].to(self.pipe.device), torch.zeros(1), pos, self.cache,
                                 contexts[p], output=False)
            self.nfe += 1
            if progress:
                progress(Progress("dit", i + 1, len(plan)))
        self._ctx_kv = contexts.get(self._prompts.index(self.prompt))

    def __repr__(self) -> str:
        return (f"CausalSession(seed={self.seed}, {self.height}x{self.width}, fragments={self.fragments}, "
                f"blocks={self.blocks}, frames={self.frames}, cache={self.cache_bytes()} B on {self.device})")
