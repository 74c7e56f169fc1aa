"""Wan2.1 VAE: diffusers' `AutoencoderKLWan` plus the glue wanserve needs.

The Wan2.1 causal 3-D VAE *is* diffusers' `AutoencoderKLWan` (same modules, same chunked feature-cache
encode/decode as upstream), so we add only: `vae_config` (a `VaeArch` as kwargs), `convert_vae_official`
(official key names <-> diffusers names, derived from `num_res_blocks` instead of hard-coded indices), and
`WanVAE` (strict loading, normalized latents, a `stream_decoder()` for block-by-block CausVid decoding).
Chunking, tiling and the one-thread-per-`WanVAE` rule: ARCHITECTURE.md.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .archs import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, VaeArch
from .checkpoint import ModelFolder, StateDict, check_state_dict, load_state_dict
from .config import ConfigError
from .validation import validated


# --------------------------------------------------------------------------------------------------
# Architecture -> diffusers config
# --------------------------------------------------------------------------------------------------
def vae_config(arch: VaeArch) -> dict[str, Any]:
    """`AutoencoderKLWan(**vae_config(arch))` is the Wan2.1 VAE `arch` describes."""
    if arch.attn_scales:
        raise ConfigError(f"vae attn_scales = {arch.attn_scales}: only () is supported (every Wan2.1 release; "
                          f"diffusers' AutoencoderKLWan has no attention in its decoder up blocks)")
    space, time = 2 ** (len(arch.dim_mult) - 1), 2 ** sum(arch.temporal_downsample)
    if (space, time) != (VAE_SPACE_STRIDE, VAE_TIME_STRIDE):
        raise ConfigError(
            f"vae dim_mult = {arch.dim_mult}, temporal_downsample = {arch.temporal_downsample}: compress "
            f"{time}x in time and {space}x in space; wanserve (and diffusers' 4-frame encode chunks) need "
            f"{VAE_TIME_STRIDE}x and {VAE_SPACE_STRIDE}x: 4 stages, 2 of them temporal")
    return {
        "base_dim": arch.base_dim,
        "z_dim": arch.z_dim,
        "dim_mult": list(arch.dim_mult),
        "num_res_blocks": arch.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(arch.temporal_downsample),  # diffusers' spelling
        "dropout": 0.0,
        "latents_mean": list(arch.latents_mean),
        "latents_std": list(arch.latents_std),
    }


# diffusers config keys that select structures other than Wan2.1's (Wan2.2's VAE), with the Wan2.1 value.
_WAN21_ONLY = {"is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3}


def arch_from_diffusers_config(cfg: Mapping[str, Any]) -> VaeArch:
    """A diffusers `vae/config.json` as a VaeArch; a Wan2.2-style VAE is refused with the keys at fault."""
    bad = {k: cfg[k] for k, ok in _WAN21_ONLY.items() if k in cfg and cfg[k] != ok}
    if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", 96)):
        bad["decoder_base_dim"] = cfg["decoder_base_dim"]
    if bad:
        raise ConfigError(f"vae/config.json {bad}: not a Wan2.1 VAE (expected {_WAN21_ONLY}, decoder_base_dim "
                          f"None or base_dim)")
    renames = {"temperal_downsample": "temporal_downsample"}
    fields = set(VaeArch.model_fields)
    d = {renames.get(k, k): v for k, v in cfg.items() if renames.get(k, k) in fields}
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return validated(VaeArch, d, "vae/config.json")


# --------------------------------------------------------------------------------------------------
# Official <-> diffusers key names
# --------------------------------------------------------------------------------------------------
# (official, diffusers) runs of dotted name parts. Keys are `[top]` or `encoder|decoder.<stem>...`;
# blocks in encoder.downsamples keep their flat index, decoder.upsamples are regrouped (see _decoder_block).
_TOP = [(("conv1",), ("quant_conv",)), (("conv2",), ("post_quant_conv",))]
_STEM = [
    (("conv1",), ("conv_in",)),
    (("head", "0"), ("norm_out",)),
    (("head", "2"), ("conv_out",)),
    (("middle", "0"), ("mid_block", "resnets", "0")),
    (("middle", "1"), ("mid_block", "attentions", "0")),
    (("middle", "2"), ("mid_block", "resnets", "1")),
]
_BLOCK = [  # inside a residual block; resample.1 / time_conv / attention names are the same in both
    (("residual", "0"), ("norm1",)),
    (("residual", "2"), ("conv1",)),
    (("residual", "3"), ("norm2",)),
    (("residual", "6"), ("conv2",)),
    (("shortcut",), ("conv_shortcut",)),
]


def _swap(parts: list[str], table, to_diffusers: bool) -> list[str]:
    """Replace the leading run of parts that matches one row of table (first match), else unchanged."""
    for off, dif in table:
        src, dst = (off, dif) if to_diffusers else (dif, off)
        if tuple(parts[:len(src)]) == src:
            return [*dst, *parts[len(src):]]
    return parts


def _decoder_block(parts: list[str], num_res_blocks: int, to_diffusers: bool) -> list[str]:
    """decoder.upsamples.<flat i>  <->  decoder.up_blocks.<stage>.{resnets.<j> | upsamplers.0}.

    Officially each stage is num_res_blocks+1 residual blocks then one Resample (none after the last stage),
    all in one flat Sequential: stage = i // (num_res_blocks+2), position = i % (num_res_blocks+2).
    """
    per = num_res_blocks + 2
    if to_diffusers:
        stage, pos = divmod(int(parts[0]), per)
        head = ["resnets", str(pos)] if pos < per - 1 else ["upsamplers", "0"]
        return [str(stage), *head, *_swap(parts[1:], _BLOCK, True)]
    stage, kind, pos = int(parts[0]), parts[1], int(parts[2])
    flat = stage * per + (pos if kind == "resnets" else per - 1)
    return [str(flat), *_swap(parts[3:], _BLOCK, False)]


def vae_key(key: str, num_res_blocks: int = 2, to_diffusers: bool = True) -> str:
    """One key renamed official -> diffusers (or back with to_diffusers=False)."""
    parts = key.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return ".".join(_swap(parts, _TOP, to_diffusers))
    side, rest = parts[0], parts[1:]
    flat, grouped = ("downsamples", "down_blocks") if side == "encoder" else ("upsamples", "up_blocks")
    src, dst = (flat, grouped) if to_diffusers else (grouped, flat)
    if rest[0] == src and side == "encoder":
        rest = [dst, rest[1], *_swap(rest[2:], _BLOCK, to_diffusers)]
    elif rest[0] == src:
        rest = [dst, *_decoder_block(rest[1:], num_res_blocks, to_diffusers)]
    else:
        rest = _swap(rest, _STEM, to_diffusers)
        if rest[0] == "mid_block" or rest[0] == "middle":  # the middle block's residual blocks
            n = 3 if to_diffusers else 2
            rest = [*rest[:n], *_swap(rest[n:], _BLOCK, to_diffusers)]
    return ".".join([side, *rest])


def convert_vae_official(sd: Mapping[str, torch.Tensor], num_res_blocks: int = 2) -> StateDict:
    """Official `Wan2.1_VAE.pth` state dict -> `AutoencoderKLWan` names (tensors are not copied)."""
    return {vae_key(k, num_res_blocks): v for k, v in sd.items()}


def is_official_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) or k == "conv1.weight" for k in sd)


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------
class WanVAE:
    """An `AutoencoderKLWan` (eval, no grad) and its latent statistics (from its config)."""

    def __init__(self, model: AutoencoderKLWan):
        model.use_tiling = False  # tiled encode/decode is not the chunked causal path (ARCHITECTURE.md)
        model.use_slicing = False
        self.model = model.eval().requires_grad_(False)
        p = next(model.parameters())
        shape = (1, model.config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(model.config.latents_mean, dtype=torch.float32, device=p.device).view(shape)
        self.std = torch.tensor(model.config.latents_std, dtype=torch.float32, device=p.device).view(shape)

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, arch: VaeArch, sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", source: str = "") -> WanVAE:
        """The VAE holding exactly sd (official or diffusers names), strict, cast to dtype.

        Built on the meta device and the tensors assigned, so the weights are in memory once.
        """
        with torch.device("meta"):
            model = AutoencoderKLWan(**vae_config(arch))
        expected = model.state_dict()
        what = f"Wan VAE (base_dim {arch.base_dim}, z_dim {arch.z_dim}, num_res_blocks {arch.num_res_blocks})"
        if is_official_vae(sd):  # check in the file's own names, so errors name keys the user can find
            nrb = arch.num_res_blocks
            check_state_dict({vae_key(k, nrb, to_diffusers=False): v for k, v in expected.items()}, sd,
                             what + " (official key names)", source)
            sd = convert_vae_official(sd, nrb)
        check_state_dict(expected, sd, what, source)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        return cls(model)

    @classmethod
    def load(cls, folder: ModelFolder, arch: VaeArch | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> WanVAE:
        """From a model folder: official `Wan2.1_VAE.pth` (architecture: `arch`, default the release) or
        diffusers `vae/` (architecture: `vae/config.json`, else `arch`)."""
        cfg = folder.component_config("vae")
        if cfg is not None:
            arch = arch_from_diffusers_config(cfg)
        arch = arch or VaeArch()
        weights = folder.vae()
        return cls.build(arch, load_state_dict(weights), dtype, device, source=str(weights))

    # ---- properties -----------------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- encode / decode ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> normalized latents [B, z, 1+(T-1)/4, H/8, W/8] (float32).

        Deterministic: the posterior mean mu, as `(mu - mean) / std`.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W] (RGB in [-1, 1]); got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % VAE_TIME_STRIDE:
            raise ValueError(f"video has T={t} frames; the causal VAE needs T = 4n+1 (1, 5, 9, ..., 81)")
        if h % VAE_SPACE_STRIDE or w % VAE_SPACE_STRIDE:
            raise ValueError(f"video is {h}x{w} (HxW); height and width must be multiples of {VAE_SPACE_STRIDE}")
        posterior = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        return (posterior.mode().float() - self.mean) / self.std

    def _post_quant(self, latents: torch.Tensor) -> torch.Tensor:
        """Check, denormalize (z*std + mean), cast: what the decoder eats after post_quant_conv."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, F, h, w]; got shape {tuple(latents.shape)}")
        return (latents.to(self.device, torch.float32) * self.std + self.mean).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, F, h, w] -> video [B, 3, 1+4(F-1), 8h, 8w] in [-1, 1] (float32)."""
        return self.model.decode(self._post_quant(latents)).sample.float().clamp_(-1, 1)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """`decode`'s video one latent frame's pixel frames at a time ([B, 3, 1 or 4, H, W]), through a fresh
        stream decoder: the same frames (StreamDecoder), but the whole video never exists at once. (A split
        VAE's stream decoder yields None on the ranks that do not get the pixels.)"""
        return stream_chunks(self, latents, 1)


def stream_chunks(decoder, latents: torch.Tensor, per_chunk: int = 1) -> Iterator[torch.Tensor | None]:
    """A decoder's video (`decoder.stream_decoder()`: the VAE's, a split VAE's, the tiny decoder's), per_chunk
    latent frames at a time: chunk by chunk equals the whole decode."""
    stream = decoder.stream_decoder()
    for i in range(0, latents.shape[2], per_chunk):
        yield stream.decode(latents[:, :, i:i + per_chunk])


def _cache_slots(decoder) -> list[bool]:
    """The Wan2.1 decoder's feature-cache slots in the order its forward fills them: True for a temporal
    upsample's time_conv (its slot starts as "Rep"; it doubles the frame rate), False for a plain causal conv.
    Every one has temporal kernel 3 and caches its last 2 input frames; 1x1x1 shortcuts take no slot."""
    slots = [False]  # conv_in
    for block in [decoder.mid_block, *decoder.up_blocks]:
        slots += [False, False] * len(block.resnets)  # conv1, conv2; the mid attention is per frame
        ups = getattr(block, "upsamplers", None)
        if ups is not None and ups[0].mode == "upsample3d":
            slots.append(True)
    return [*slots, False]  # conv_out


def decoder_history(decoder) -> int:
    """R: the decoder's state after latent frame n is a function of latent frames [n-R+1, n] alone.

    Every op is per frame except the causal convs (frame t sees t-2..t of its input and caches t-1, t), so
    the state, the cache, is a finite impulse response of the latents. Walked exactly, per output frame of
    the newest latent frame: lag[p] is how far back (in latent frames) frame p of it reaches; a frame r
    positions earlier at r frames per latent frame is one latent frame further back. R = 1 + the deepest lag
    of a cached frame. Per conv that is +2 at 1 frame per latent frame, +1 at 2, +1 per 2 convs at 4:
    Wan2.1 (12, 7 and 13 convs) gives 1 + 24 + 7 + 6 = 38, i.e. 8 num_res_blocks + 22.
    """
    lag, deepest = [0], 0

    def conv():
        nonlocal lag, deepest
        r = len(lag)
        at = [lag[q % r] - q // r for q in range(-2, r)]  # at[q + 2]: input frame q (< 0: earlier latent frames)
        deepest = max(deepest, *at[-2:])  # the cache: the last 2 input frames
        lag = [max(at[p:p + 3]) for p in range(r)]

    for doubles in _cache_slots(decoder):
        conv()
        if doubles:
            lag = [x for x in lag for _ in range(2)]
    return deepest + 1


def check_resume(tail: torch.Tensor, start_frame: int, history_frames: int) -> int:
    """A stream decoder's `resume` arguments (tail = latent frames [start_frame, end), at least the last
    min(history_frames, end) of them); returns end."""
    if tail.dim() != 5 or start_frame < 0:
        raise ValueError(f"resume: tail must be [B, z, f, h, w] latents and start_frame >= 0; got shape "
                         f"{tuple(tail.shape)}, start_frame {start_frame}")
    end = start_frame + tail.shape[2]
    need = min(history_frames, end)
    if tail.shape[2] < need:
        raise ValueError(f"resume: the state after latent frame {end - 1} depends on the last {need} latent "
                         f"frames [{end - need}, {end}); got {tail.shape[2]} (from {start_frame})")
    return end


class StreamDecoder:
    """Decodes a latent video chunk by chunk with one causal feature cache, exactly like one whole decode.

    `decode(z[:, :, 0:3])` then `decode(z[:, :, 3:6])`, concatenated in time, equals `vae.decode(z[:, :, 0:6])`:
    the first latent frame gives 1 pixel frame, every later one 4. Mirrors `AutoencoderKLWan._decode`, but
    one latent frame at a time from post_quant_conv on, so each frame's arithmetic is the same whatever the
    chunking (what makes `resume` bit for bit).
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        n = sum(isinstance(m, WanCausalConv3d) for m in vae.model.decoder.modules())
        self.feat_cache: list = [None] * n  # one slot per causal conv; upsample3d's first slot holds "Rep"
        self.latent_frames = 0  # decoded so far
        self._shape: tuple[int, ...] | None = None  # (B, h, w): the cache holds one video
        # how many latent frames `resume` needs (`decoder_history`): 38 for every Wan2.1 VAE release; walked once
        # here, not on every block a session prunes after
        self.history_frames = decoder_history(vae.model.decoder)

    # ---- the state, as a session keeps it (the tiny decoder's stream decoder has the same three) ----
    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in self.feat_cache if isinstance(t, torch.Tensor)]

    def to(self, device: str | torch.device, copy: bool = False) -> StreamDecoder:
        self.feat_cache = [t.to(device, copy=copy) if isinstance(t, torch.Tensor) else t for t in self.feat_cache]
        return self

    def clear(self) -> None:
        self.feat_cache = [None] * len(self.feat_cache)

    def _frames(self, latents: torch.Tensor):
        """Each latent frame's raw decoder output in turn, advancing the cache."""
        model = self.vae.model
        if latents.dim() == 5:
            shape = (latents.shape[0], *latents.shape[3:])
            if self._shape not in (None, shape):
                raise ValueError(f"stream decoder: chunk has (B, h, w) = {shape}, earlier chunks {self._shape}; "
                                 f"one stream decoder per video")
            self._shape = shape
        z = self.vae._post_quant(latents)
        for i in range(z.shape[2]):
            x = model.post_quant_conv(z[:, :, i:i + 1])  # 1x1x1 conv: no state across frames
            out = model.decoder(x, feat_cache=self.feat_cache, feat_idx=[0], first_chunk=self.latent_frames == 0)
            self.latent_frames += 1
            yield out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, z, f, h, w] normalized latents (the next f frames) -> their pixel frames, float32 in [-1, 1]."""
        return torch.cat(list(self._frames(latents)), 2).float().clamp_(-1, 1)

    @torch.no_grad()
    def resume(self, tail: torch.Tensor, start_frame: int) -> StreamDecoder:
        """This decoder, in the state of one that decoded latent frames [0, start_frame + f), from only the
        last f of them: tail = frames [start_frame, start_frame + f), f >= min(history_frames, start_frame + f).

        A session restores in O(history) instead of re-decoding its video. Frames before start_frame are
        replaced by zeros, the causal convs' own padding: None slots, and "Rep" in the temporal upsamples'
        slots, which zero-pads too but doubles the frame rate (None would decode a first frame). After
        `history_frames` latent frames nothing of those zeros is left in the cache (`decoder_history`).
        """
        check_resume(tail, start_frame, self.history_frames)
        self.feat_cache = [None] * len(self.feat_cache)
        for i, up in enumerate(_cache_slots(self.vae.model.decoder)):
            if up and start_frame:
                self.feat_cache[i] = "Rep"
        self.latent_frames, self._shape = start_frame, None
        for _ in self._frames(tail):
            pass
        return self
