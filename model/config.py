"""Configuration models: Wan2.1 architectures and LightX2V-compatible runtime keys.

Users bring LightX2V `config_json` files and official/diffusers model folders, so both are read as they
are. Unknown LightX2V keys (attention kernels, offload settings, ...) are kept and reported, never fatal.
A bad value fails with the key, the value and the rule it broke.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
VAE_TIME_STRIDE = 4  # causal VAE: T pixel frames -> 1 + (T-1)/4 latent frames
VAE_SPACE_STRIDE = 8


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names key, value and rule."""


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if not e["loc"]:  # a rule across keys: its message names them
            lines.append(msg)
        elif "input" in e and e["type"] != "missing":
            lines.append(f"{key} = {e['input']!r}: {msg}")
        else:
            lines.append(f"{key}: {msg}")
    return f"invalid {where}:\n  " + "\n  ".join(lines)


def validated(cls, data: dict, where: str):
    """cls.model_validate(data) with a ConfigError that lists every bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------
class DiTArch(BaseModel):
    """WanModel constructor arguments (official names). Defaults are upstream's constructor defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: Literal["t2v", "i2v"] = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = Field(512, gt=0)
    in_dim: int = Field(16, gt=0)
    dim: int = Field(2048, gt=0)
    ffn_dim: int = Field(8192, gt=0)
    freq_dim: int = Field(256, gt=0)
    text_dim: int = Field(4096, gt=0)
    out_dim: int = Field(16, gt=0)
    num_heads: int = Field(16, gt=0)
    num_layers: int = Field(32, gt=0)
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    img_dim: int = Field(1280, gt=0)  # CLIP width; upstream hard-codes 1280

    @field_validator("freq_dim")
    @classmethod
    def _even_freq(cls, v):
        if v % 2:
            raise ValueError("must be even (sin/cos halves)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        d = self.dim // self.num_heads
        c = d // 2
        if d % 2 or c // 3 == 0:
            raise ValueError(f"head_dim={d} must be even and >= 6 so RoPE splits into time/height/width parts")
        if self.model_type == "i2v" and self.in_dim != 2 * self.out_dim + VAE_TIME_STRIDE:
            raise ValueError(
                f"i2v needs in_dim = 2*out_dim + {VAE_TIME_STRIDE} (noise + mask + image latent); "
                f"got in_dim={self.in_dim}, out_dim={self.out_dim}")
        if self.model_type == "t2v" and self.in_dim != self.out_dim:
            raise ValueError(f"t2v needs in_dim == out_dim; got {self.in_dim} and {self.out_dim}")
        if self.model_type == "i2v" and self.text_len != 512:
            # the I2V context is [257 image tokens | text_len text tokens]; upstream splits at 512.
            raise ValueError(f"i2v needs text_len=512 (upstream splits image/text context at 512); got {self.text_len}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    def num_tokens(self, latent_frames: int, latent_h: int, latent_w: int) -> int:
        pt, ph, pw = self.patch_size
        return (latent_frames // pt) * (latent_h // ph) * (latent_w // pw)

    @classmethod
    def from_config_json(cls, cfg: dict[str, Any]) -> "DiTArch":
        """Read an official (`_class_name: WanModel`) or diffusers (`WanTransformer3DModel`) config.json."""
        if cfg.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in cfg:
            heads = cfg["num_attention_heads"]
            image = cfg.get("image_dim")
            d = dict(
                model_type="i2v" if image else "t2v",
                patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
                in_dim=cfg.get("in_channels", 16),
                out_dim=cfg.get("out_channels", 16),
                dim=heads * cfg["attention_head_dim"],
                ffn_dim=cfg["ffn_dim"],
                freq_dim=cfg.get("freq_dim", 256),
                text_dim=cfg.get("text_dim", 4096),
                num_heads=heads,
                num_layers=cfg["num_layers"],
                cross_attn_norm=cfg.get("cross_attn_norm", True),
                qk_norm=cfg.get("qk_norm", "rms_norm_across_heads") is not None,
                eps=cfg.get("eps", 1e-6),
            )
            if image:
                d["img_dim"] = image
            if "text_len" in cfg:
                d["text_len"] = cfg["text_len"]
        else:
            keys = set(cls.model_fields)
            d = {k: v for k, v in cfg.items() if k in keys}
            for k in ("patch_size", "window_size"):
                if k in d:
                    d[k] = tuple(d[k])
        return validated(cls, d, "DiT config.json")

    def to_config_json(self) -> dict[str, Any]:
        """The official config.json (plus the extension keys a tiny model needs)."""
        out = {"_class_name": "WanModel", **self.model_dump()}
        out["patch_size"] = list(self.patch_size)
        out["window_size"] = list(self.window_size)
        return out

    def to_diffusers_config(self) -> dict[str, Any]:
        out = {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
            "eps": self.eps,
            "image_dim": self.img_dim if self.is_i2v else None,
            "added_kv_proj_dim": self.dim if self.is_i2v else None,
            "rope_max_seq_len": 1024,
        }
        if self.text_len != 512:  # only tiny models; diffusers itself always pads text to 512
            out["text_len"] = self.text_len
        return out


WAN21_T2V_1_3B = DiTArch(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_T2V_14B = DiTArch(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN21_I2V_14B = DiTArch(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
TINY_T2V = DiTArch(model_type="t2v", in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=32,
                   text_len=16, num_heads=2, num_layers=2)
TINY_I2V = DiTArch(model_type="i2v", in_dim=12, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=32,
                   text_len=512, num_heads=2, num_layers=2, img_dim=32)

ARCH_PRESETS: dict[str, DiTArch] = {
    "t2v-1.3B": WAN21_T2V_1_3B,
    "t2v-14B": WAN21_T2V_14B,
    "i2v-14B": WAN21_I2V_14B,
    "tiny-t2v": TINY_T2V,
    "tiny-i2v": TINY_I2V,
}


class T5Arch(BaseModel):
    """umT5 encoder (Wan's `umt5_xxl(encoder_only=True)`); defaults are the XXL release."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vocab_size: int = Field(256384, gt=0)
    dim: int = Field(4096, gt=0)
    dim_attn: int = Field(4096, gt=0)
    ffn_dim: int = Field(10240, gt=0)
    num_heads: int = Field(64, gt=0)
    num_layers: int = Field(24, gt=0)
    num_buckets: int = Field(32, gt=0)
    max_distance: int = Field(128, gt=0)
    eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn={self.dim_attn} must be divisible by num_heads={self.num_heads}")
        return self


class ClipArch(BaseModel):
    """The visual tower of open-clip xlm-roberta-large-vit-huge-14 as Wan uses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image_size: int = Field(224, gt=0)
    patch_size: int = Field(14, gt=0)
    width: int = Field(1280, gt=0)
    num_layers: int = Field(32, gt=0)
    num_heads: int = Field(16, gt=0)
    mlp_ratio: float = 4.0
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @model_validator(mode="after")
    def _check(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.num_layers < 2:
            raise ValueError("num_layers must be >= 2 (Wan uses the output of the second-to-last block)")
        return self

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


WAN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class VaeArch(BaseModel):
    """Wan2.1 causal 3-D VAE (`WanVAE_`); defaults are Wan2.1_VAE.pth."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_dim: int = Field(96, gt=0)
    z_dim: int = Field(16, gt=0)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = Field(2, gt=0)
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_LATENTS_STD

    @model_validator(mode="after")
    def _check(self):
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} values each")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs len(dim_mult)-1 entries")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("latents_std must be positive")
        return self


class ComponentArchs(BaseModel):
    """Optional `<model_path>/wanserve.json`: architectures of non-standard (tiny) official-layout models.

    Real Wan2.1 folders need no such file: the defaults are the released T5/CLIP/VAE.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    t5: T5Arch = T5Arch()
    clip: ClipArch = ClipArch()
    vae: VaeArch = VaeArch()
    tokenizer_dir: str = "google/umt5-xxl"


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

    @model_validator(mode="after")
    def _check(self):
        u, r = self.degrees()
        if u * r != self.seq_p_size:
            raise ValueError(f"seq_p_size = {self.seq_p_size}: must equal ulysses_degree*ring_degree ({u}*{r})")
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


MODEL_CLASSES = ("wan2.1", "wan2.1_distill", "wan2.1_causvid")
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

    model_cls: Literal["wan2.1", "wan2.1_distill", "wan2.1_causvid"] = "wan2.1"
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
    # None: the model class's own (wan2.1_distill: deterministic, as LightX2V; wan2.1_causvid: fresh_noise, as
    # CausVid and Self-Forcing), see schedulers.make_sampler.
    renoise: Literal["deterministic", "fresh_noise"] | None = None
    # Self-Forcing/CausVid key: map denoising_step_list through the shifted grid (t -> 1000*shift(t/1000)).
    # None: the model class's own (wan2.1_distill: true, as LightX2V; wan2.1_causvid: false, as CausVid's
    # released configs and LightX2V's CausVid runner, whose list is already in model-timestep space).
    warp_denoising_step: bool | None = None
    sample_neg_prompt: str = ""
    seed: int = Field(42, ge=0)
    fps: int = Field(16, gt=0, le=120)
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

    @field_validator("dit_quant_scheme", "t5_quant_scheme", "clip_quant_scheme")
    @classmethod
    def _quant(cls, v):
        return _quant_scheme_ok(v)

    @model_validator(mode="after")
    def _check(self):
        if self.model_cls in ("wan2.1_distill", "wan2.1_causvid") and self.enable_cfg:
            raise ValueError(f"enable_cfg = true: must be false for model_cls={self.model_cls} (the student was "
                             "distilled without CFG; set \"enable_cfg\": false)")
        if self.dit_quantized and not self.dit_quant_scheme:
            raise ValueError("dit_quantized = true: needs dit_quant_scheme (int8-* or fp8-*)")
        if self.model_cls == "wan2.1_causvid":
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
        return self

    # ---- derived values ----
    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})

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
        if self.model_cls == "wan2.1_causvid" and self.frame_seq_length is not None:
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


def latent_frames(frames: int) -> int:
    return (frames - 1) // VAE_TIME_STRIDE + 1


def ceil_to(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)
