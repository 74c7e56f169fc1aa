"""LightX2V-compatible runtime configuration: the config_json keys wanserve acts on.

Users bring LightX2V `config_json` files and official/diffusers model folders, so both are read as they
are. Unknown LightX2V keys (offload settings, ...) are kept and reported, never fatal.
A bad value fails with the key, the value and the rule it broke; a key wanserve would not act on in the
given combination is refused, never silently ignored. Architectures are model/archs.py.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import registry
from .archs import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, DiTArch, latent_frames
from .kernels import DEFAULT_KERNEL, KERNEL_KEYS, check_kernel_name
from .validation import ConfigError, validated

log = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000

# --------------------------------------------------------------------------------------------------
# LightX2V runtime configuration
# --------------------------------------------------------------------------------------------------
class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str
    strength: float = 1.0
    name: str | None = None


class ParallelConfig(BaseModel):
    """LightX2V's `parallel` block; `ulysses_degree`/`ring_degree` are wanserve's hybrid split."""

    model_config = ConfigDict(extra="allow")
    seq_p_size: int = Field(1, ge=1)
    seq_p_attn_type: Literal["ulysses", "ring"] = "ulysses"
    cfg_p_size: Literal[1, 2] = 1
    ulysses_degree: int | None = Field(None, ge=1)
    ring_degree: int | None = Field(None, ge=1)
    dit_fsdp: bool = False
    # wanserve: who runs the sequence-parallel attention of the bidirectional forward: wanserve's own Ulysses x
    # ring (with the configured self_attn_1_type kernel), or xDiT's / yunchang's LongContextAttention (CUDA)
    sp_backend: Literal["wanserve", "xfuser", "yunchang"] = "wanserve"
    # wanserve: the VAE decode (and I2V encode) split by rows over every rank of the group (parallel/vae.py),
    # on whenever the group has more than one rank; false: rank 0 decodes alone
    vae_parallel: bool = True

    @model_validator(mode="after")
    def _check(self):
        u, r = self.degrees()
        if u * r != self.seq_p_size:
            raise ValueError(f"seq_p_size = {self.seq_p_size}: must equal ulysses_degree*ring_degree ({u}*{r})")
        if self.sp_backend != "wanserve" and self.seq_p_size == 1:
            raise ValueError(f"sp_backend = {self.sp_backend!r}: shards attention over seq_p_size > 1 ranks; with "
                             "seq_p_size = 1 drop the key")
        return self

    def degrees(self) -> tuple[int, int]:
        """(ulysses, ring) degrees; LightX2V's single attn type puts the whole group on one axis."""
        if self.ulysses_degree is None and self.ring_degree is None:
            if self.seq_p_attn_type == "ulysses":
                return self.seq_p_size, 1
            return 1, self.seq_p_size
        u = self.ulysses_degree or max(1, self.seq_p_size // (self.ring_degree or 1))
        r = self.ring_degree or max(1, self.seq_p_size // u)
        return u, r

    @property
    def world_size(self) -> int:
        return self.seq_p_size * self.cfg_p_size


TASKS = ("t2v", "i2v")
QUANT_SCHEMES = ("int8", "fp8")  # matched by prefix: int8-vllm, fp8-sgl, ...


def _quant_scheme_ok(v: str | None) -> str | None:
    if v is None:
        return v
    if not any(v == s or v.startswith(s + "-") for s in QUANT_SCHEMES):
        raise ValueError("must be an int8-* or fp8-* scheme (e.g. int8-vllm, fp8-sgl)")
    if v.startswith(("fp8-pertensor", "fp8-b128")):
        raise ValueError("per-tensor and 128x128-block fp8 scales are not supported: use a per-channel scheme "
                         "(e.g. fp8-sgl, fp8-vllm)")
    return v


class RunConfig(BaseModel):
    """The keys of a LightX2V config_json that wanserve acts on. Other keys are kept in `extras`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    model_cls: registry.ModelClsName = registry.BASE.name
    task: Literal["t2v", "i2v"] = "t2v"
    infer_steps: int = Field(50, gt=0, le=1000)
    target_video_length: int = Field(81, gt=0)
    target_height: int = Field(480, gt=0)
    target_width: int = Field(832, gt=0)
    text_len: int = Field(512, gt=0)
    sample_shift: float = Field(5.0, gt=0)
    sample_guide_scale: float = Field(5.0, ge=0)
    enable_cfg: bool = True
    denoising_step_list: list[int] | None = None
    # wanserve: how a distill step re-noises: LightX2V's deterministic Euler jump or Self-Forcing's fresh noise.
    # None: the model class's own (model/registry.py: the distill student deterministic, as LightX2V; CausVid
    # fresh_noise, as CausVid and Self-Forcing), see schedulers.make_sampler.
    renoise: Literal["deterministic", "fresh_noise"] | None = None
    # Self-Forcing/CausVid key: map denoising_step_list through the shifted grid (t -> 1000*shift(t/1000)).
    # None: the model class's own (the distill student: true, as LightX2V; CausVid: false, as CausVid's
    # released configs and LightX2V's CausVid runner, whose list is already in model-timestep space).
    warp_denoising_step: bool | None = None
    sample_neg_prompt: str = ""
    seed: int = Field(42, ge=0)
    fps: int = Field(16, gt=0, le=120)
    # wanserve: the longest prompt a request may carry (the Serve app passes its configured limit in here)
    max_prompt_chars: int = Field(4096, gt=0)
    lora_configs: list[LoraConfig] = Field(default_factory=list)
    dit_original_ckpt: str | None = None
    dit_quantized: bool = False
    dit_quant_scheme: str | None = None
    dit_quantized_ckpt: str | None = None
    t5_quantized: bool = False
    t5_quant_scheme: str | None = None
    clip_quantized: bool = False
    clip_quant_scheme: str | None = None
    parallel: ParallelConfig | None = None
    # CausVid
    num_fragments: int = Field(1, ge=1)
    num_frames: int = Field(21, gt=0)
    num_frame_per_block: int = Field(3, gt=0)
    num_blocks: int = Field(7, gt=0)
    frame_seq_length: int | None = Field(None, gt=0)
    attention_window: int | None = Field(None, gt=0)  # latent frames kept in the CausVid cache
    sink_frames: int = Field(0, ge=0)  # first latent frames never evicted from a windowed cache
    # wanserve: how fragment k+1 continues fragment k (model/causal.py): "cache" keeps the session's K/V cache
    # (positions keep counting); "last_block" restarts it from the previous fragment's last block (LightX2V).
    fragment_continuation: Literal["cache", "last_block"] = "cache"
    # wanserve, the long-video cache policy (model/causal.py; the student of training/ is trained under it):
    # "relative": a windowed cache attends with window-relative temporal positions, the sink re-positioned just
    # before the window, so a session never runs out of RoPE positions; "absolute": every frame keeps its absolute
    # position (Self-Forcing's inference; a session ends at RoPE's 1,024 latent frames). Without a window both are
    # the same (nothing is evicted, positions count up to 1,024).
    rope_positions: Literal["relative", "absolute"] = "relative"
    # what a new prompt does to a session's cache: "recache" re-runs the clean pass of the frames the next block
    # sees under the new prompt (LongLive); "keep" keeps their K/V and swaps only the cross-attention
    prompt_switch: Literal["recache", "keep"] = "recache"
    # the CausVid K/V cache in int8 with per-group scales (model/kvquant.py): half of bf16's bytes
    kv_cache_quant: Literal["none", "int8"] = "none"
    # attention kernels by LightX2V's keys (model/kernels.py); a kernel that cannot run here fails the load
    self_attn_1_type: str = DEFAULT_KERNEL
    cross_attn_1_type: str = DEFAULT_KERNEL
    cross_attn_2_type: str = DEFAULT_KERNEL  # the i2v image branch; validated for t2v too (LightX2V sets it)
    # wanserve: torch.compile the DiT blocks, warmed up at load for the config's size and `warmup_sizes`
    compile: bool = False
    warmup_sizes: list[str] | None = None  # extra "WIDTHxHEIGHT" sizes compiled before the first request
    # wanserve: how fp8 weights multiply: scaled fp8 GEMMs where the GPU has them ("auto"), always
    # ("scaled_mm", an error where unsupported), or dequantized to the compute dtype first ("dequant")
    dit_fp8_compute: Literal["auto", "scaled_mm", "dequant"] = "auto"
    # LightX2V's tiny decoder keys (model/tae.py: TAEHV for Wan latents, e.g. taew2_1.pth): tae_path loads it
    # (relative paths: inside the model folder), use_tae makes it the default decoder; a request may ask for
    # either with `decoder` ("full" | "tiny") when tae_path is set
    use_tae: bool = False
    tae_path: str | None = None

    @field_validator("target_video_length")
    @classmethod
    def _frames(cls, v):
        if (v - 1) % VAE_TIME_STRIDE:
            raise ValueError(f"frames must be 4n+1 (the VAE compresses time by 4), e.g. {4 * ((v - 1) // 4) + 1} or "
                             f"{4 * ((v - 1) // 4 + 1) + 1}")
        return v

    @field_validator("target_height", "target_width")
    @classmethod
    def _size(cls, v):
        if v % 16:
            raise ValueError(f"must be a multiple of 16 (VAE stride 8 x patch 2), e.g. {16 * round(v / 16) or 16}")
        return v

    @field_validator("denoising_step_list")
    @classmethod
    def _steps(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("must not be empty")
        if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in v):
            raise ValueError(f"every timestep must be in (0, {NUM_TRAIN_TIMESTEPS}]")
        if any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError("timesteps must be strictly decreasing")
        return v

    @field_validator("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type")
    @classmethod
    def _kernel(cls, v):
        return check_kernel_name(v)

    @field_validator("warmup_sizes")
    @classmethod
    def _warmup(cls, v):
        if v is None:
            return v
        for size in v:
            h, w = parse_size(size)
            if h % 16 or w % 16:
                raise ValueError(f"{size}: width and height must be multiples of 16")
        return v

    @field_validator("dit_quant_scheme", "t5_quant_scheme", "clip_quant_scheme")
    @classmethod
    def _quant(cls, v):
        return _quant_scheme_ok(v)

    @model_validator(mode="after")
    def _check(self):
        mc = self.model_class
        if not mc.cfg and self.enable_cfg:
            raise ValueError(f"enable_cfg = true: must be false for model_cls={self.model_cls} (the student was "
                             "distilled without CFG; set \"enable_cfg\": false)")
        self._check_weights(mc)
        if self.warmup_sizes and not self.compile:
            raise ValueError(f"warmup_sizes = {self.warmup_sizes}: warm-up compiles the DiT; set compile = true or drop "
                             "the key")
        if self.use_tae and not self.tae_path:
            raise ValueError("use_tae = true: needs tae_path (the tiny decoder's weights, e.g. taew2_1.pth)")
        if self.dit_fp8_compute == "scaled_mm" and not (self.dit_quantized and self.dit_quant_scheme.startswith("fp8")):
            raise ValueError("dit_fp8_compute = 'scaled_mm': needs fp8 weights (dit_quantized = true with an fp8-* "
                             "dit_quant_scheme)")
        if mc.sessions:
            if self.num_frames != self.num_frame_per_block * self.num_blocks:
                raise ValueError(f"num_frames = {self.num_frames}: must equal num_frame_per_block*num_blocks "
                                 f"({self.num_frame_per_block}*{self.num_blocks})")
            if latent_frames(self.target_video_length) != self.num_frames:
                raise ValueError(f"target_video_length = {self.target_video_length}: is "
                                 f"{latent_frames(self.target_video_length)} latent frames, but a CausVid fragment is "
                                 f"num_frames = {self.num_frames} latent frames; set target_video_length = "
                                 f"{VAE_TIME_STRIDE * (self.num_frames - 1) + 1}")
            if self.fragment_continuation == "last_block" and self.num_blocks < 2:
                raise ValueError(f"fragment_continuation = 'last_block' with num_blocks = {self.num_blocks}: a fragment "
                                 "re-uses one block as context and needs at least one new block (num_blocks >= 2)")
            if self.sink_frames and self.attention_window is None:
                raise ValueError(f"sink_frames = {self.sink_frames}: needs attention_window (without a window nothing "
                                 "is evicted, so there is nothing to keep a sink from)")
            if self.attention_window is not None and self.attention_window < self.sink_frames + self.num_frame_per_block:
                raise ValueError(f"attention_window = {self.attention_window}: must hold the sink and the block being "
                                 f"generated, i.e. >= sink_frames + num_frame_per_block "
                                 f"({self.sink_frames} + {self.num_frame_per_block})")
            if self.sink_frames % self.num_frame_per_block and self.rope_positions == "relative":
                raise ValueError(f"sink_frames = {self.sink_frames}: with rope_positions = 'relative' the sink is re-"
                                 f"positioned as whole blocks, so it must be a multiple of num_frame_per_block "
                                 f"({self.num_frame_per_block}); or use rope_positions = 'absolute'")
        return self

    def _check_weights(self, mc: registry.ModelClass) -> None:
        """Weight-file and quantization keys: each is acted on, or refused with the reason (never ignored)."""
        for part in ("dit", "t5", "clip"):
            on, scheme = getattr(self, f"{part}_quantized"), getattr(self, f"{part}_quant_scheme")
            if on and not scheme:
                raise ValueError(f"{part}_quantized = true: needs {part}_quant_scheme (int8-* or fp8-*)")
            if scheme and not on:
                raise ValueError(f"{part}_quant_scheme = {scheme!r}: set {part}_quantized = true to quantize, or drop "
                                 "the key")
        if self.clip_quantized and self.task != "i2v":
            raise ValueError(f"clip_quantized = true: task {self.task!r} loads no CLIP image encoder (i2v only); drop "
                             "the key")
        if self.dit_quantized_ckpt and not self.dit_quantized:
            raise ValueError(f"dit_quantized_ckpt = {self.dit_quantized_ckpt!r}: needs dit_quantized = true and its "
                             "dit_quant_scheme")
        if self.dit_quantized_ckpt and self.lora_configs:
            raise ValueError("lora_configs with dit_quantized_ckpt: merge LoRAs into full-precision weights, then "
                             "quantize on load (drop dit_quantized_ckpt)")
        if self.dit_original_ckpt and (mc.student is None or self.lora_configs):
            why = (f"model_cls={mc.name} loads the base DiT of the model folder" if mc.student is None else
                   "with lora_configs the base DiT of the model folder is loaded and the LoRAs merged into it")
            raise ValueError(f"dit_original_ckpt = {self.dit_original_ckpt!r}: not used ({why}); drop the key")
        for part in ("t5", "clip"):
            key = f"{part}_quantized_ckpt"
            if self.extras.get(key) is not None:
                raise ValueError(f"{key} = {self.extras[key]!r}: pre-quantized {part.upper()} files are not supported; "
                                 f"drop the key ({part}_quantized quantizes the released weights on load)")

    # ---- derived values ----
    @property
    def model_class(self) -> registry.ModelClass:
        return registry.model_class(self.model_cls)

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})

    @property
    def kernel_names(self) -> dict[str, str]:
        """{LightX2V attention key: kernel name} (model/kernels.py)."""
        return {key: getattr(self, key) for key in KERNEL_KEYS}

    @property
    def steps(self) -> int:
        """Number of sampler steps: the step list's length when there is one (as LightX2V does)."""
        return len(self.denoising_step_list) if self.denoising_step_list else self.infer_steps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return ((self.target_video_length - 1) // VAE_TIME_STRIDE + 1,
                self.target_height // VAE_SPACE_STRIDE, self.target_width // VAE_SPACE_STRIDE)

    def check_arch(self, arch: DiTArch) -> None:
        """Rules that need the architecture: head split for Ulysses, CausVid tokens per frame."""
        errors = []
        if self.parallel is not None:
            u, _ = self.parallel.degrees()
            if arch.num_heads % u:
                errors.append(f"parallel.ulysses degree = {u}: must divide num_heads={arch.num_heads}")
        _, lh, lw = self.latent_shape
        _, ph, pw = arch.patch_size
        if lh % ph or lw % pw:
            errors.append(f"target size {self.target_height}x{self.target_width}: latent {lh}x{lw} must be a "
                          f"multiple of the patch {ph}x{pw}")
        if self.text_len != arch.text_len and arch.is_i2v:
            errors.append(f"text_len = {self.text_len}: must be {arch.text_len} for this model")
        if self.model_class.sessions and self.frame_seq_length is not None:
            per_frame = (lh // ph) * (lw // pw)
            if self.frame_seq_length != per_frame:
                errors.append(f"frame_seq_length = {self.frame_seq_length}: must equal tokens per latent frame at "
                              f"{self.target_height}x{self.target_width} = {per_frame}")
        if errors:
            raise ConfigError("invalid config for this model:\n  " + "\n  ".join(errors))


def load_run_config(source: str | Path | dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """Read a LightX2V config_json (path or dict) and apply overrides (CLI flags: model_cls, task...)."""
    if source is None:
        data: dict[str, Any] = {}
        where = "config"
    elif isinstance(source, dict):
        data = dict(source)
        where = "config"
    else:
        path = Path(source)
        where = f"config {path}"
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = validated(RunConfig, data, where)
    if cfg.extras:
        log.info("config keys kept but not used by wanserve: %s", ", ".join(sorted(cfg.extras)))
    return cfg


def shift_sigma(sigma: float, shift: float) -> float:
    """Flow-matching time shift used by every Wan sampler."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def parse_size(size: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" (OpenAI's and the CLIs' order: width first) -> (height, width), the config's order."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX*]\s*(\d{1,5})\s*", str(size))
    if not m:
        raise ValueError(f"size {size!r}: expected WIDTHxHEIGHT, e.g. 832x480")
    width, height = int(m.group(1)), int(m.group(2))
    return height, width


def format_size(height: int, width: int) -> str:
    """(height, width) -> "WIDTHxHEIGHT"."""
    return f"{width}x{height}"
