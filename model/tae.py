"""TAEHV, the tiny autoencoder for Wan2.1 latents (madebyollin/taehv's `taew2_1.pth`), and `TinyDecoder`.

Why: the full causal 3-D VAE decode is a large part of a few-step student's time; TAEHV (2-D convs plus
MemBlocks that see the previous frame) decodes the same latents far cheaper, at some loss of quality.
`TAEHV` keeps the release's `encoder.N` / `decoder.N` Sequential indices, so `taew2_1.pth` loads strict;
the decoder widths are a parameter (the demo model ships a narrow one). `TinyDecoder` gives it the contract
of `WanVAE.decode` (normalized latents in, [B, 3, 1+4(F-1), 8h, 8w] in [-1, 1] out) and a chunk-by-chunk
`stream_decoder()` equal to one whole decode. Facts about the release: training/README.md, tests/test_tae.py.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, StateDict, check_state_dict, load_state_dict
from .vae import check_resume

RELEASE_CHANNELS = (256, 128, 64, 64)  # taew2_1's decoder widths (n_f)
ENCODER_WIDTH = 64
# Per stage of the release: decoder TGrow strides (time upscale 1, 2, 2 -> 4x) and encoder TPool strides.
DECODER_TIME = (1, 2, 2)
ENCODER_TIME = (2, 2, 1)
LATENT_SPACES = ("normalized", "raw")


def _conv(cin: int, cout: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): 3 tanh(x / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(convs(cat[x_t, x_{t-1}]) + skip(x_t)): a residual block that also sees its own previous input frame."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """stride consecutive frames stacked on channels, 1x1 conv back to n channels (time / stride)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """1x1 conv to n * stride channels, split into stride consecutive frames (time x stride)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


# Nearest 2x upsampling then a 3x3 conv (padding 1) is, per output phase p (row or column parity), a 3x3
# conv at the low resolution that uses two of its taps: _PHASE[p][low tap, high tap] (high tap dy reads low
# row (2i + p + dy) // 2 - i).
_PHASE = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]], [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest_upsample_2x(x)) computed at x's resolution (4 phases as one conv, then pixel shuffle):
    the same products regrouped (taps reading the same low-res pixel are summed into one weight), without the
    upsampled input in memory; the TGrow before it then also runs at the low resolution."""
    ph = _PHASE.to(conv.weight)
    w = torch.einsum("pay,qbx,oiyx->opqiab", ph, ph, conv.weight).flatten(0, 2)  # [cout*4, cin, 3, 3]
    bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
    return nn.functional.pixel_shuffle(nn.functional.conv2d(x, w, bias, padding=1), 2)


def _fusable(seq: nn.Sequential, i: int) -> bool:
    """seq[i:i+3] is Upsample(2x nearest), TGrow, 3x3 conv: the TGrow (1x1) commutes with the upsample."""
    if i + 2 >= len(seq):
        return False
    up, grow, conv = seq[i], seq[i + 1], seq[i + 2]
    return (isinstance(up, nn.Upsample) and up.scale_factor in (2, 2.0) and up.mode == "nearest"
            and isinstance(grow, TGrow) and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.groups == 1)


def run_blocks(seq: nn.Sequential, x: torch.Tensor, n: int, memory: dict[int, torch.Tensor] | None = None,
               trim: int = 0, fast: bool = False) -> torch.Tensor:
    """seq over frames x [n*T, C, H, W] ((batch, time) order), all frames of a block at once.

    A MemBlock's past is its input one frame earlier: zeros before the first frame, or memory[i] (the last
    input frame of the previous chunk, [n, C, H, W]); memory, if given, is updated for the next chunk. trim
    drops that many leading output frames, as early as possible: after the last MemBlock every block is
    per frame, so frames that only feed trimmed outputs are not computed. TPool needs T % stride == 0.
    fast: each Upsample, TGrow, conv run as TGrow then `upsample_conv` (equal up to rounding; inference).
    """
    mems = [i for i, b in enumerate(seq) if isinstance(b, MemBlock)]
    last_mem = mems[-1] if mems else -1

    def drop(x, i, trim):  # leading frames that feed only trimmed outputs, before block i
        if trim and i > last_mem:
            rest = math.prod(g.stride for g in seq[i:] if isinstance(g, TGrow))
            k = trim // rest
            if k:
                return x.unflatten(0, (n, -1))[:, k:].flatten(0, 1), trim - k * rest
        return x, trim

    i = 0
    while i < len(seq):
        b = seq[i]
        x, trim = drop(x, i, trim)
        if fast and _fusable(seq, i):
            x, trim = drop(seq[i + 1](x), i + 2, trim)
            x = upsample_conv(seq[i + 2], x)
            i += 3
            continue
        if isinstance(b, MemBlock):
            xt = x.unflatten(0, (n, -1))
            prev = memory.get(i) if memory is not None else None
            first = torch.zeros_like(xt[:, :1]) if prev is None else prev.unsqueeze(1).to(xt)
            past = torch.cat([first, xt[:, :-1]], 1).flatten(0, 1)
            if memory is not None:
                memory[i] = xt[:, -1].detach().clone()
            x = b(x, past)
        else:
            x = b(x)
        i += 1
    if trim:
        x = x.unflatten(0, (n, -1))[:, trim:].flatten(0, 1)
    return x


def decoder_history(seq: nn.Sequential) -> int:
    """R: the state after latent frame n (each MemBlock's last input frame) is a function of latent frames
    [n-R+1, n] alone. A MemBlock's output at a sub-frame sees its input there and one sub-frame earlier (the
    last of the previous latent frame, one further back, for the first); lag[p] is how many latent frames
    back sub-frame p of the newest latent frame reaches. The release layout gives 8."""
    lag, deepest = [0], 0
    for b in seq:
        if isinstance(b, MemBlock):
            deepest = max(deepest, lag[-1])  # what it keeps: its input's last sub-frame
            lag = [max(lag[p], lag[p - 1] if p else lag[-1] + 1) for p in range(len(lag))]
        elif isinstance(b, TGrow):
            lag = [x for x in lag for _ in range(b.stride)]
    return deepest + 1


class TAEHV(nn.Module):
    """The TAEHV layout of taew2_1 (patch 1): `decoder` always, `encoder` if asked for (the release has both).

    decoder: 0 Clamp, 1 conv(z, c0), 2 ReLU, then per stage s (base 3 + 6s): 3 MemBlock(c_s), Upsample x2,
    TGrow(c_s, 1 | 2 | 2), conv(c_s, c_{s+1}, no bias); 21 ReLU, 22 conv(c3, 3). encoder: 0 conv(3, 64),
    1 ReLU, per stage (base 2 + 5s): TPool(64, 2 | 2 | 1), conv(64, 64, stride 2, no bias), 3 MemBlock(64);
    17 conv(64, z). Pixels in [0, 1], frames NTCHW; decoding F latent frames gives 4F frames, of which the
    first 3 are trimmed (4F - 3 = 1 + 4(F - 1), the Wan VAE's count).
    """

    def __init__(self, latent_channels: int = 16, channels: Sequence[int] = RELEASE_CHANNELS, encoder: bool = True,
                 encoder_width: int = ENCODER_WIDTH, image_channels: int = 3):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1 or latent_channels < 1:
            raise ValueError(f"TAEHV needs 4 positive decoder widths and latent_channels >= 1; got {channels}, "
                             f"{latent_channels}")
        self.latent_channels, self.channels, self.image_channels = latent_channels, channels, image_channels
        self.encoder_width = encoder_width if encoder else 0
        self.frames_to_trim = math.prod(DECODER_TIME) - 1
        dec: list[nn.Module] = [Clamp(), _conv(latent_channels, channels[0]), nn.ReLU()]
        for s, stride in enumerate(DECODER_TIME):
            c = channels[s]
            dec += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c), nn.Upsample(scale_factor=2), TGrow(c, stride),
                    _conv(c, channels[s + 1], bias=False)]
        self.decoder = nn.Sequential(*dec, nn.ReLU(), _conv(channels[3], image_channels))
        if encoder:
            e = encoder_width
            enc: list[nn.Module] = [_conv(image_channels, e), nn.ReLU()]
            for stride in ENCODER_TIME:
                enc += [TPool(e, stride), _conv(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e),
                        MemBlock(e, e)]
            self.encoder = nn.Sequential(*enc, _conv(e, latent_channels))
        else:
            self.encoder = None

    @property
    def t_downscale(self) -> int:
        return math.prod(ENCODER_TIME)

    def decode_frames(self, z: torch.Tensor, memory: dict[int, torch.Tensor] | None = None, trim: int | None = None,
                      fast: bool = False, channels_last: bool = False) -> torch.Tensor:
        """Latents NTCHW -> raw frames NTCHW (unclamped, ~[0, 1]); trim (default frames_to_trim) leading frames
        dropped. The training loss uses this (a clamp has no gradient outside the range); fast: `run_blocks`;
        channels_last: the frames in that memory format (oneDNN's small-channel convs run faster on it)."""
        n = z.shape[0]
        trim = self.frames_to_trim if trim is None else trim
        x = z.flatten(0, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return run_blocks(self.decoder, x, n, memory, trim, fast).unflatten(0, (n, -1))

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """Latents NTCHW [N, F, z, h, w] -> RGB NTCHW [N, 4F - 3, 3, 8h, 8w] in [0, 1]."""
        return self.decode_frames(z).clamp(0, 1)

    def encode_video(self, x: torch.Tensor) -> torch.Tensor:
        """RGB NTCHW in [0, 1] -> latents NTCHW (T padded at the end to a multiple of 4 with the last frame)."""
        if self.encoder is None:
            raise RuntimeError("this TAEHV was built without an encoder (decoder-only weights)")
        pad = -x.shape[1] % self.t_downscale
        if pad:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
        n = x.shape[0]
        return run_blocks(self.encoder, x.flatten(0, 1), n).unflatten(0, (n, -1))


# --------------------------------------------------------------------------------------------------
# Architecture from a state dict, strict loading
# --------------------------------------------------------------------------------------------------
def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str, why: str) -> tuple[int, ...]:
    if key not in sd or sd[key].dim() != 4:
        raise CheckpointError(f"{source or 'state dict'}: not a TAEHV state dict: key {key!r} is missing or not "
                              f"a conv weight ({why})")
    return tuple(sd[key].shape)


def arch_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "") -> dict:
    """TAEHV(**arch) for these weights: latent_channels and widths from the decoder convs' shapes, the
    encoder (and its width) if there are encoder.* keys."""
    why = "the decoder convs decoder.1, .8, .14, .20 give its widths"
    first = _shape(sd, "decoder.1.weight", source, why)
    channels = (first[0], *(_shape(sd, f"decoder.{3 + 6 * s + 5}.weight", source, why)[0] for s in range(3)))
    arch = {"latent_channels": first[1], "channels": channels, "encoder": any(k.startswith("encoder.") for k in sd)}
    if arch["encoder"]:
        arch["encoder_width"] = _shape(sd, "encoder.0.weight", source, "encoder.* keys are present")[0]
    return arch


def build_tae(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              source: str = "") -> TAEHV:
    """The TAEHV holding exactly sd (strict: missing / unexpected keys and shape mismatches are named)."""
    arch = arch_from_state_dict(sd, source)
    with torch.device("meta"):
        tae = TAEHV(**arch)
    what = f"TAEHV (latent_channels {arch['latent_channels']}, decoder widths {arch['channels']}" + \
           (f", encoder width {arch['encoder_width']})" if arch["encoder"] else ", no encoder)")
    check_state_dict(tae.state_dict(), sd, what, source)
    tae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return tae.eval().requires_grad_(False)


def save_tae(tae: TAEHV, path: str | Path, dtype: torch.dtype | None = None, decoder_only: bool = False) -> Path:
    """tae's state dict to a .pth (torch.save) or .safetensors file, optionally cast (fp16 halves it)."""
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tae.state_dict().items()
          if not (decoder_only and k.startswith("encoder."))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


# --------------------------------------------------------------------------------------------------
# The WanVAE.decode contract
# --------------------------------------------------------------------------------------------------
class TinyDecoder:
    """A TAEHV decoder behind `WanVAE.decode`'s contract (eval, no grad).

    latent_space: what the TAE eats. "normalized" (taew2_1 and TAEHV generally: the DiT's latents as they are,
    LightX2V's `need_scaled=False`) or "raw" (the VAE's posterior mean z * std + mean, as LightX2V's
    lighttaew2_1 with `need_scaled=True`); latents_mean / latents_std (the full VAE's) are needed for "raw".
    """

    def __init__(self, tae: TAEHV, latents_mean: Sequence[float] | None = None,
                 latents_std: Sequence[float] | None = None, latent_space: str = "normalized"):
        if latent_space not in LATENT_SPACES:
            raise ValueError(f"latent_space {latent_space!r}: expected one of {LATENT_SPACES}")
        self.tae = tae.eval()  # decode runs under no_grad; a model still in training keeps its grads
        self.latent_space = latent_space
        z = tae.latent_channels
        shape = (1, z, 1, 1, 1)
        stats = []
        for name, v in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if v is not None and len(v) != z:
                raise ValueError(f"{name} has {len(v)} values; the TAE has {z} latent channels")
            stats.append(None if v is None else torch.tensor(list(v), dtype=torch.float32).view(shape))
        self.mean, self.std = stats
        if latent_space == "raw" and (self.mean is None or self.std is None):
            raise ValueError("latent_space 'raw' needs the full VAE's latents_mean and latents_std")

    @classmethod
    def load(cls, path: str | Path, latents_mean: Sequence[float] | None = None,
             latents_std: Sequence[float] | None = None, latent_space: str = "normalized",
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TinyDecoder:
        """From a `.pth` (torch.load, weights_only) or `.safetensors` file: the release or a narrower one."""
        return cls(build_tae(load_state_dict(path), dtype, device, source=str(path)), latents_mean, latents_std,
                   latent_space)

    @property
    def z_dim(self) -> int:
        return self.tae.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.tae.parameters()).device

    def tae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Check normalized latents [B, z, F, h, w]; -> the TAE's input NTCHW [B, F, z, h, w] in its space."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, F, h, w]; got shape {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32)
        if self.latent_space == "raw":
            z = z * self.std.to(z.device) + self.mean.to(z.device)
        return z.transpose(1, 2).to(self.dtype)

    @staticmethod
    def video(frames: torch.Tensor) -> torch.Tensor:
        """TAE frames NTCHW in [0, 1] -> video [B, 3, T, H, W] float32 in [-1, 1]."""
        return frames.transpose(1, 2).float().mul(2).sub(1).clamp_(-1, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, F, h, w] -> video [B, 3, 1+4(F-1), 8h, 8w] in [-1, 1] (float32)."""
        return self.video(self.tae.decode_frames(self.tae_input(latents), fast=True, channels_last=True))

    def stream_decoder(self) -> TinyStreamDecoder:
        return TinyStreamDecoder(self)


class TinyStreamDecoder:
    """Chunk by chunk, like `model.vae.StreamDecoder`: `decode(z[:, :, 0:2])` then `decode(z[:, :, 2:5])`,
    concatenated in time, equals `decode(z[:, :, 0:5])` (to rounding: the whole decode batches all frames);
    the first latent frame gives 1 pixel frame, each later one 4. The state is each MemBlock's last input
    frame (one [B, C, H, W] tensor per block). Latent frames go through one at a time, so the chunking does
    not change a bit of the result, and `resume` restores the state bit for bit."""

    def __init__(self, tiny: TinyDecoder):
        self.tiny = tiny
        self.memory: dict[int, torch.Tensor] = {}
        self.latent_frames = 0  # decoded so far
        self._shape: tuple[int, ...] | None = None  # (B, h, w): the state holds one video

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, z, f, h, w] normalized latents (the next f frames) -> their pixel frames, float32 in [-1, 1]."""
        z = self.tiny.tae_input(latents)
        shape = (z.shape[0], *z.shape[3:])
        if self._shape not in (None, shape):
            raise ValueError(f"stream decoder: chunk has (B, h, w) = {shape}, earlier chunks {self._shape}; "
                             f"one stream decoder per video")
        self._shape = shape
        tae, out = self.tiny.tae, []
        for i in range(z.shape[1]):  # one latent frame at a time: the same arithmetic whatever the chunking
            trim = tae.frames_to_trim if self.latent_frames == 0 else 0
            out.append(tae.decode_frames(z[:, i:i + 1], self.memory, trim, fast=True, channels_last=True))
            self.latent_frames += 1
        return self.tiny.video(torch.cat(out, 1))

    # ---- the state, as a CausVid session keeps it (the VAE's StreamDecoder has the same three) ----
    def state_tensors(self) -> list[torch.Tensor]:
        return list(self.memory.values())

    def to(self, device: str | torch.device, copy: bool = False) -> TinyStreamDecoder:
        self.memory = {i: t.to(device, copy=copy) for i, t in self.memory.items()}
        return self

    def clear(self) -> None:
        self.memory = {}

    @property
    def history_frames(self) -> int:
        """How many latent frames `resume` needs (`decoder_history`: 8 for the release layout)."""
        return decoder_history(self.tiny.tae.decoder)

    @torch.no_grad()
    def resume(self, tail: torch.Tensor, start_frame: int) -> TinyStreamDecoder:
        """This decoder, in the state of one that decoded latent frames [0, start_frame + f), from only the last
        f of them (tail = frames [start_frame, start_frame + f), f >= min(history_frames, start_frame + f)).
        Frames before start_frame count as zeros, a MemBlock's own past at a video's start; after
        history_frames latent frames none of them is left in the state. Only the blocks up to the last
        MemBlock run (the frames are not decoded)."""
        end = check_resume(tail, start_frame, self.history_frames)
        z = self.tiny.tae_input(tail)
        dec = self.tiny.tae.decoder
        last_mem = max(i for i, b in enumerate(dec) if isinstance(b, MemBlock))
        self.memory = {}  # the same arithmetic as `decode` (frame by frame, fast, channels_last), bit for bit
        for i in range(z.shape[1]):
            x = z[:, i].contiguous(memory_format=torch.channels_last)
            run_blocks(dec[:last_mem + 1], x, z.shape[0], self.memory, fast=True)
        self.latent_frames, self._shape = end, (z.shape[0], *z.shape[3:])
        return self


def layout_shapes(latent_channels: int = 16, channels: Sequence[int] = RELEASE_CHANNELS,
                   encoder: bool = True) -> StateDict:
    """Key -> meta tensor of the layout (what a weight file must hold), for checks and tools."""
    with torch.device("meta"):
        return TAEHV(latent_channels, channels, encoder).state_dict()


__all__ = ["TAEHV", "TinyDecoder", "TinyStreamDecoder", "MemBlock", "TPool", "TGrow", "Clamp", "arch_from_state_dict",
           "build_tae", "save_tae", "decoder_history", "layout_shapes", "run_blocks", "upsample_conv"]
