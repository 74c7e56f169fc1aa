"""Wan2.1 architectures: the DiT, umT5, CLIP and VAE shapes, read from official or diffusers config files.

Defaults are the released models'; the presets name the sizes the planners and tests use.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .validation import validated

VAE_TIME_STRIDE = 4  # causal VAE: T pixel frames -> 1 + (T-1)/4 latent frames
VAE_SPACE_STRIDE = 8


def latent_frames(frames: int) -> int:
    return (frames - 1) // VAE_TIME_STRIDE + 1


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
