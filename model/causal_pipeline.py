"""CausVid generation: fragments of blocks over one K/V cache, and sessions that keep it between calls.

Why: a CausVid-distilled Wan (LightX2V `model_cls = wan2.1_causvid`) makes video block by block, so a video
can keep growing. LightX2V generates `num_fragments` fragments in one call; wanserve also lets a client
keep a session open and ask for the next fragment when it wants it (optionally with a new prompt), and
streams every block out as soon as it is decoded. `CausVidPipeline.generate` is the one-call form and is
literally a session run `num_fragments` times, so both give the same frames.

One block (num_frame_per_block latent frames at RoPE frame `pos`; the model side is model/causal.py):
  noise [1, z, f, h, w] float32 from the session's noise generator (seeded with `seed`, drawn block after
  block); for each step of the step-distill sampler (schedulers.make_sampler: the CausVid list
  [999, 934, …, 74], unwarped — the DiT is fed t, σ = t/1000 — re-noised with fresh noise from a second
  generator seeded `seed + 1`, as CausVid/Self-Forcing do) one block forward that overwrites the block's
  cache slots; then the clean pass at t = 0 that leaves the block's clean K/V in the cache; then the block
  is decoded by the session's streaming VAE decoder (chunk by chunk equals decoding the video at once).
  DiT forwards per block: steps + 1.

How a fragment continues the previous one (`fragment_continuation`):
  "cache" (default) — the session's cache carries over and positions keep counting: fragment k covers
    latent frames [k·num_frames, (k+1)·num_frames), attending to everything kept (no window: all of the
    session; `attention_window`: the sink plus the most recent frames). This is Self-Forcing's rolling
    inference; RoPE's 1024 positions bound a session (~48 fragments of 21 frames), and a fragment that
    would cross it is refused up front.
  "last_block" — LightX2V's runner (`wan_causvid_runner.py`, removed upstream in #348): each fragment after
    the first resets the cache, re-runs the previous fragment's last block at frame 0 to fill it, and
    generates num_blocks − 1 new blocks at frames 3…20, so fragments add 21, 18, 18, … latent frames and
    positions never pass num_frames. LightX2V re-ran the block's *noisy* last-step sample (the UniPC
    scheduler's `last_sample`) at the last step's timestep; we re-run its clean latents at t = 0 — the
    same cache-filling pass every block gets (LightX2V's later step-distill scheduler no longer kept a
    `last_sample`, so its own path had stopped working before it was removed).

Sessions (`CausVidPipeline.start_session`): the K/V cache, the cross-attention cache (per prompt; a new
prompt replaces it and nothing else), the streaming decoder, the latents and decoded frames of every
block, and the two generators. `next_fragment` checks `cancel` between DiT steps: a cancel inside a block
rewinds the generators to the block's start (its cache slots are rewritten by the retry, which evicts
exactly what the cancelled block did); blocks that finished stay in the session (they were handed to
`on_block`), and the next `next_fragment` finishes the interrupted fragment and returns only the rest —
so a cancelled-and-resumed session ends up with the same video as an uninterrupted one.

`state_dict()` / `CausalSession.restore()`: the state is small (prompts, latents of every block, generator
states, counters, the settings that shape generation); the caches are not in it. Restoring rebuilds them:
the video and the streaming decoder by decoding every block again, and the K/V cache by re-running each
block's clean t = 0 pass in order ("cache": every block of the session; "last_block": the re-anchor and
the blocks of an interrupted fragment, nothing at a fragment boundary). Each of those passes sees exactly
the inputs it saw the first time, so the rebuilt session equals the original bit for bit (same device,
dtype and kernels) and its next fragment is the one the original would have produced. Cost: one DiT
forward per replayed block (1/(steps+1) of generating it) and one VAE decode of the video so far.

Sequence parallelism (parallel/causal_runner.py drives it): every rank of the SP group holds a
`CausalSession` of the same video and runs the same calls in lockstep; the DiT's layout shards each block
forward and each rank's cache holds its share (parallel/causal.py). Ranks other than 0 load the pipeline
`denoise_only` (no text encoder, no VAE): they get the prompt's umT5 context from rank 0 (the runner puts a
broadcasting encoder in `text_encoder`) and keep no decoder, frames or video (their `next_fragment` returns
None). Noise is not broadcast: every rank's session seeds the same two generators and draws the same numbers
in the same order, so the noise is identical everywhere for free (and survives cancel, offload and restore
the same way as on one process).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .causal import ROPE_MAX_POSITIONS, CausalDiT, tensor_bytes
from .config import ConfigError, RunConfig, validated
from .dit import WanModel
from .encoders import TextEncoder
from .pipeline import (MAX_PROMPT_CHARS, Cancelled, CancelFn, Generation, Progress, ProgressFn, RequestError,
                       StageTimer, load_components)
from .schedulers import make_sampler
from .vae import WanVAE
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


def check_causvid(cfg: RunConfig, arch) -> None:
    """Everything a CausVid run needs from the config and the DiT, as one ConfigError."""
    if cfg.model_cls != "wan2.1_causvid":
        raise ConfigError(f"model_cls = {cfg.model_cls!r}: the CausVid pipeline runs model_cls = 'wan2.1_causvid'")
    if cfg.task != "t2v" or arch.is_i2v:
        raise ConfigError("CausVid is text-to-video only (as in LightX2V): use task = 't2v' with a T2V model; "
                          "image-to-video needs model_cls wan2.1 or wan2.1_distill")
    if cfg.parallel is not None and cfg.parallel.cfg_p_size > 1:
        raise ConfigError(f"parallel.cfg_p_size = {cfg.parallel.cfg_p_size}: CausVid runs without CFG (one branch), so "
                          "there is nothing to split; use seq_p_size for more GPUs per session")
    if cfg.parallel is not None and cfg.parallel.dit_fsdp:
        raise ConfigError("parallel.dit_fsdp with CausVid is not supported: a block forward calls the DiT's embeddings "
                          "and head outside WanModel.forward, where FSDP2 does not unshard them")
    cfg.check_arch(arch)


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return prompt


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class CausVidPipeline:
    """A loaded CausVid model: the causal DiT, the text encoder, the VAE and the per-block sampler.

    text_encoder and vae None: a denoise-only pipeline (ranks > 0 of a sequence-parallel group; see the
    module docstring). Its sessions decode nothing, and it encodes prompts only through an encoder put in
    `text_encoder` by the parallel runner.
    """

    def __init__(self, dit: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | None, cfg: RunConfig,
                 device: str | torch.device = "cpu"):
        check_causvid(cfg, dit.arch)
        self.dit, self.text_encoder, self.vae, self.cfg = dit, text_encoder, vae, cfg
        self.denoise_only = text_encoder is None and vae is None
        self.device = torch.device(device)
        self.arch = dit.arch
        self.causal = CausalDiT(dit, cfg.num_frame_per_block, cfg.attention_window, cfg.sink_frames)
        self.sampler = make_sampler(cfg)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, cfg: RunConfig, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, lora_roots: list[str | Path] | None = None,
                        denoise_only: bool = False) -> "CausVidPipeline":
        """`<model_path>/causvid_models/causal_model.{safetensors,pt}` (or `dit_original_ckpt`; with lora_configs
        the base DiT plus LoRAs, as LightX2V), the base folder's T5 and VAE (not with denoise_only)."""
        dit, text, vae, _ = load_components(model_path, cfg, check_causvid, device, dtype, lora_roots, denoise_only)
        return cls(dit, text, vae, cfg, device)

    # ---- requests --------------------------------------------------------------------------------
    def check_request(self, seed: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(seed, height, width) with the config's defaults filled in; a RequestError says what is wrong."""
        over = {k: v for k, v in dict(target_height=height, target_width=width, seed=seed).items() if v is not None}
        try:
            merged = validated(RunConfig, {**self.cfg.model_dump(), **over}, "request")
            merged.check_arch(self.arch)  # frame_seq_length must match the size
        except ConfigError as e:
            raise RequestError(str(e)) from None
        return merged.seed, merged.target_height, merged.target_width

    def fragment_blocks(self, fragment: int) -> int:
        """New blocks fragment `fragment` (0-based) adds."""
        cfg = self.cfg
        return cfg.num_blocks - (fragment > 0 and cfg.fragment_continuation == "last_block")

    def check_length(self, fragments: int) -> None:
        """Refuse a run of `fragments` fragments whose RoPE positions would pass the table's end."""
        cfg = self.cfg
        if cfg.fragment_continuation == "cache" and fragments * cfg.num_frames > ROPE_MAX_POSITIONS:
            raise RequestError(f"num_fragments = {fragments}: {fragments * cfg.num_frames} latent frames, beyond "
                               f"RoPE's {ROPE_MAX_POSITIONS} positions (at most "
                               f"{ROPE_MAX_POSITIONS // cfg.num_frames} fragments of {cfg.num_frames} frames with "
                               "fragment_continuation = 'cache')")

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """umT5 context [1, text_len, dim] float32 on the pipeline's device."""
        if self.text_encoder is None:
            raise RuntimeError("this CausVid pipeline was loaded denoise_only (no text encoder); under sequence "
                               "parallelism rank 0 encodes and the runner shares the context")
        ctx, _ = self.text_encoder.encode([_check_prompt(prompt)])
        return ctx[:1].to(self.device)

    def state_config(self) -> dict[str, Any]:
        """The settings a session's state depends on: a state restores only into a pipeline with the same."""
        cfg, arch, s = self.cfg, self.arch, self.sampler
        return {"num_frame_per_block": cfg.num_frame_per_block, "num_blocks": cfg.num_blocks,
                "attention_window": cfg.attention_window, "sink_frames": cfg.sink_frames,
                "fragment_continuation": cfg.fragment_continuation, "timesteps": s.timesteps.tolist(),
                "sigmas": s.sigmas.tolist(), "renoise": s.renoise,
                "arch": {"dim": arch.dim, "num_layers": arch.num_layers, "num_heads": arch.num_heads,
                         "out_dim": arch.out_dim, "text_len": arch.text_len}}

    # ---- sessions and one-call generation ----------------------------------------------------------
    def start_session(self, prompt: str, seed: int | None = None, height: int | None = None,
                      width: int | None = None) -> "CausalSession":
        seed, height, width = self.check_request(seed, height, width)
        return CausalSession(self, _check_prompt(prompt), seed, height, width)

    def restore_session(self, state: dict[str, Any], progress: ProgressFn | None = None) -> "CausalSession":
        return CausalSession.restore(self, state, progress)

    def generate(self, prompt: str, seed: int | None = None, height: int | None = None, width: int | None = None,
                 num_fragments: int | None = None, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 on_block: Callable[[BlockOutput], None] | None = None) -> Generation:
        """LightX2V's one call: `num_fragments` (default: the config's) fragments of one session."""
        n = self.cfg.num_fragments if num_fragments is None else num_fragments
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError(f"num_fragments = {n!r}: must be an integer >= 1")
        self.check_length(n)
        t0 = time.perf_counter()
        session = self.start_session(prompt, seed, height, width)
        videos, timings = [], {}
        for _ in range(n):
            videos.append(session.next_fragment(progress=progress, cancel=cancel, on_block=on_block))
            for k, v in session.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        timings["total"] = time.perf_counter() - t0
        latents = session.latents()
        session.release()  # a throwaway session: free its caches now
        return Generation(torch.cat(videos, dim=1), latents, session.seed, session.nfe, timings, fps=self.cfg.fps)


class CausalSession:
    """One growing video: its caches, its blocks so far, and the generators of the blocks to come.

    Made by `CausVidPipeline.start_session` / `restore_session`. Sessions share the pipeline's model and
    nothing else, so any number can be open; the pipeline runs one call at a time (one thread).
    """

    def __init__(self, pipe: CausVidPipeline, prompt: str, seed: int, height: int, width: int):
        self.pipe = pipe
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
        prompt = _check_prompt(prompt)
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
    def check_state(cls, pipe: CausVidPipeline, state: Any) -> tuple[int, int, int]:
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
        _check_prompt(state["prompt"])
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
    def restore(cls, pipe: CausVidPipeline, state: dict[str, Any],
                progress: ProgressFn | None = None) -> "CausalSession":
        """Rebuild a session from `state_dict()` (module docstring: what is reproduced, and at what cost)."""
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
