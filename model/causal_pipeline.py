"""CausVid generation: a CausVid-distilled Wan (the model class with sessions, model/registry.py) makes video
block by block over one K/V cache, so a video can keep growing.

LightX2V generates `num_fragments` fragments in one call; wanserve also keeps a session open between calls
(model/causal_session.py) and streams every block as soon as it is decoded. `CausVidPipeline.generate` is
literally a session run `num_fragments` times, so both give the same frames. The model side is
model/causal.py; the design (block loop, fragment continuation, state and restore, sequence parallelism):
ARCHITECTURE.md.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import registry
from .causal import ROPE_MAX_POSITIONS, CausalDiT, window_relative
from .causal_session import BlockOutput, CausalSession
from .config import ConfigError, RunConfig
from .dit import WanModel
from .encoders import TextEncoder
from .compile import keep_attention_eager
from .pipeline import CancelFn, Generation, ProgressFn, RequestError, check_prompt, load_components, load_tiny_decoder
from .schedulers import make_sampler
from .tae import TinyDecoder
from .vae import WanVAE
from .validation import validated

__all__ = ["BlockOutput", "CausalSession", "CausVidPipeline", "check_causvid", "fragment_prompts"]


def fragment_prompts(prompt: str, schedule: list | None, fragments: int | None = None,
                     max_chars: int | None = None) -> list[str]:
    """The prompt of every fragment of a one-call CausVid video: `prompt` throughout, or a schedule of spans
    [(prompt, fragments), ...] (or {"prompt", "fragments"} dicts) run in order, the prompt switching between
    them (a re-cache each, `prompt_switch`). With a schedule `prompt` must be its first prompt, and `fragments`
    (if given) its total; with `max_chars` every prompt passes `check_prompt`. A RequestError says what does not
    fit."""
    out = [prompt] * (1 if fragments is None else fragments) if not schedule else _spans(prompt, schedule, fragments)
    if max_chars is not None:
        for p in dict.fromkeys(out):
            check_prompt(p, max_chars)
    return out


def _spans(prompt: str, schedule: list, fragments: int | None) -> list[str]:
    out: list[str] = []
    for i, span in enumerate(schedule):
        pair = ((span.get("prompt"), span.get("fragments")) if isinstance(span, dict)
                else tuple(span) if isinstance(span, (list, tuple)) else ())
        text, n = pair if len(pair) == 2 else (None, None)
        if not isinstance(text, str) or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError(f"prompt_schedule[{i}]: needs a prompt (a string) and fragments (an integer >= 1)")
        out += [text] * n
    if out[0] != prompt:
        raise RequestError("prompt_schedule: its first prompt must be the request's prompt")
    if fragments is not None and fragments != len(out):
        raise RequestError(f"prompt_schedule covers {len(out)} fragments, num_fragments = {fragments}: give one, or "
                           "make them agree")
    return out


def check_causvid(cfg: RunConfig, arch) -> None:
    """Everything a CausVid run needs from the config and the DiT, as one ConfigError."""
    mc = cfg.model_class
    if not mc.sessions:
        runs = " or ".join(repr(m.name) for m in registry.MODEL_CLASSES.values() if m.sessions)
        raise ConfigError(f"model_cls = {cfg.model_cls!r}: the CausVid pipeline runs model_cls = {runs}")
    if cfg.task not in mc.tasks or arch.is_i2v:
        i2v = " or ".join(m.name for m in registry.MODEL_CLASSES.values() if "i2v" in m.tasks)
        raise ConfigError(f"CausVid is text-to-video only (as in LightX2V): use task = 't2v' with a T2V model; "
                          f"image-to-video needs model_cls {i2v}")
    if cfg.parallel is not None and cfg.parallel.cfg_p_size > 1:
        raise ConfigError(f"parallel.cfg_p_size = {cfg.parallel.cfg_p_size}: CausVid runs without CFG (one branch), so "
                          "there is nothing to split; use seq_p_size for more GPUs per session")
    if cfg.parallel is not None and cfg.parallel.dit_fsdp:
        raise ConfigError("parallel.dit_fsdp with CausVid is not supported: a block forward calls the DiT's embeddings "
                          "and head outside WanModel.forward, where FSDP2 does not unshard them")
    cfg.check_arch(arch)


class CausVidPipeline:
    """A loaded CausVid model: the causal DiT, the text encoder, the VAE and the per-block sampler.

    text_encoder and vae None: a denoise-only pipeline (ranks > 0 of a sequence-parallel group; see
    ARCHITECTURE.md). Its sessions decode nothing, and it encodes prompts only through an encoder put in
    `text_encoder` by the parallel runner.
    """

    def __init__(self, dit: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | None, cfg: RunConfig,
                 device: str | torch.device = "cpu"):
        check_causvid(cfg, dit.arch)
        self.dit, self.text_encoder, self.vae, self.cfg = dit, text_encoder, vae, cfg
        self.tiny: TinyDecoder | None = None  # the tiny decoder (tae_path), rank 0 only
        self.denoise_only = text_encoder is None and vae is None
        self.device = torch.device(device)
        self.arch = dit.arch
        self.causal = CausalDiT(dit, cfg.num_frame_per_block, cfg.attention_window, cfg.sink_frames, cfg.rope_positions,
                                cfg.kv_cache_quant)
        if cfg.compile:  # the cache attention stays out of the compiled blocks (model/compile.py says why)
            keep_attention_eager(dit, self.causal)
        self.sampler = make_sampler(cfg)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, cfg: RunConfig, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, lora_roots: list[str | Path] | None = None,
                        denoise_only: bool = False) -> "CausVidPipeline":
        """`<model_path>/causvid_models/causal_model.{safetensors,pt}` (or `dit_original_ckpt`; with lora_configs
        the base DiT plus LoRAs, as LightX2V), the base folder's T5 and VAE (not with denoise_only)."""
        dit, text, vae, _ = load_components(model_path, cfg, check_causvid, device, dtype, lora_roots, denoise_only)
        pipe = cls(dit, text, vae, cfg, device)
        pipe.tiny = None if denoise_only else load_tiny_decoder(model_path, cfg, vae, device)
        return pipe

    def stream_decoder(self):
        """A session's streaming decoder: the tiny one under use_tae (rank 0 alone), else the VAE's (a split VAE's
        on every rank); None on a rank that decodes nothing."""
        if self.cfg.use_tae:
            return self.tiny.stream_decoder() if self.tiny is not None else None
        return self.vae.stream_decoder() if self.vae is not None else None

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
        unbounded = window_relative(cfg.attention_window, cfg.rope_positions)
        if cfg.fragment_continuation == "cache" and not unbounded and fragments * cfg.num_frames > ROPE_MAX_POSITIONS:
            raise RequestError(f"num_fragments = {fragments}: {fragments * cfg.num_frames} latent frames, beyond "
                               f"RoPE's {ROPE_MAX_POSITIONS} positions (at most "
                               f"{ROPE_MAX_POSITIONS // cfg.num_frames} fragments of {cfg.num_frames} frames with "
                               "fragment_continuation = 'cache' and no window; a window with rope_positions = "
                               "'relative' has no end)")

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """umT5 context [1, text_len, dim] float32 on the pipeline's device."""
        if self.text_encoder is None:
            raise RuntimeError("this CausVid pipeline was loaded denoise_only (no text encoder); under sequence "
                               "parallelism rank 0 encodes and the runner shares the context")
        ctx, _ = self.text_encoder.encode([check_prompt(prompt, self.cfg.max_prompt_chars)])
        return ctx[:1].to(self.device)

    def state_config(self) -> dict[str, Any]:
        """The settings a session's state depends on: a state restores only into a pipeline with the same."""
        cfg, arch, s = self.cfg, self.arch, self.sampler
        return {"num_frame_per_block": cfg.num_frame_per_block, "num_blocks": cfg.num_blocks,
                "attention_window": cfg.attention_window, "sink_frames": cfg.sink_frames,
                "fragment_continuation": cfg.fragment_continuation, "rope_positions": cfg.rope_positions,
                "prompt_switch": cfg.prompt_switch, "kv_cache_quant": cfg.kv_cache_quant,
                "timesteps": s.timesteps.tolist(),
                "sigmas": s.sigmas.tolist(), "renoise": s.renoise,
                "arch": {"dim": arch.dim, "num_layers": arch.num_layers, "num_heads": arch.num_heads,
                         "out_dim": arch.out_dim, "text_len": arch.text_len}}

    # ---- sessions and one-call generation ----------------------------------------------------------
    def start_session(self, prompt: str, seed: int | None = None, height: int | None = None,
                      width: int | None = None, history: bool = False) -> "CausalSession":
        """history=True keeps the whole video (latents(), video(), save()); a server's session keeps only what
        its next fragment and a restore need (model/causal_session.py)."""
        seed, height, width = self.check_request(seed, height, width)
        return CausalSession(self, check_prompt(prompt, self.cfg.max_prompt_chars), seed, height, width, history)

    def restore_session(self, state: dict[str, Any], progress: ProgressFn | None = None) -> "CausalSession":
        return CausalSession.restore(self, state, progress)

    def generate(self, prompt: str, seed: int | None = None, height: int | None = None, width: int | None = None,
                 num_fragments: int | None = None, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 on_block: Callable[[BlockOutput], None] | None = None,
                 prompt_schedule: list | None = None) -> Generation:
        """LightX2V's one call: `num_fragments` (default: the config's, or the schedule's) fragments of one session;
        `prompt_schedule` switches the prompt between fragments (`fragment_prompts`)."""
        n = num_fragments if num_fragments is not None or prompt_schedule else self.cfg.num_fragments
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise RequestError(f"num_fragments = {n!r}: must be an integer >= 1")
        prompts = fragment_prompts(prompt, prompt_schedule, n, self.cfg.max_prompt_chars)
        n = len(prompts)
        self.check_length(n)
        t0 = time.perf_counter()
        session = self.start_session(prompt, seed, height, width, history=True)
        videos, timings = [], {}
        for p in prompts:
            videos.append(session.next_fragment(prompt=p, progress=progress, cancel=cancel, on_block=on_block))
            for k, v in session.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        timings["total"] = time.perf_counter() - t0
        latents = session.latents()
        session.release()  # a throwaway session: free its caches now
        return Generation(torch.cat(videos, dim=1), latents, session.seed, session.nfe, timings, fps=self.cfg.fps)
