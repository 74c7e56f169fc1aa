"""The Wan VAE split by latent rows over a replica's ranks (parallel/vae.py): the largest band and the bytes moved.

Why: decoding on rank 0 alone leaves the other SP ranks idle for seconds per video. Split by height, the
convolutions' work follows the rows (the largest band sets the pace); what the split adds is traffic: a halo
row before every 3x3 conv, the mid-block attention's all-gather (the attention itself runs whole on every
rank) and the final gather. The convs, their padded input shapes (causal cache included) and the attention
are counted on the real module on the meta device, as flops.py counts FLOPs; timing.py prices the bytes at
the collectives' fitted bandwidth. capacity/README.md.
"""
from __future__ import annotations

import functools
import re
from dataclasses import astuple, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from capacity.flops import vae_module
from model.archs import VaeArch

VAE_BYTES = 4  # the Wan VAE runs in float32 (model/pipeline.py, upstream): halos, gathers and its output


def row_bands(rows: int, ranks: int) -> tuple[tuple[int, int], ...]:
    """[a_r, b_r) latent rows of each rank: an even split, the remainder one row each over the first ranks."""
    base, extra = divmod(rows, ranks)
    bands, a = [], 0
    for r in range(ranks):
        b = a + base + (1 if r < extra else 0)
        bands.append((a, b))
        a = b
    return tuple(bands)


def max_band(rows: int, ranks: int) -> int:
    """Rows of the largest band (rank 0's): ceil(rows / ranks)."""
    return max(b - a for a, b in row_bands(rows, ranks))


@dataclass(frozen=True)
class VaeTraffic:
    """What one decode (or encode) of a video passes through its row-coupled layers, counted on meta as
    parallel/vae.py moves it: sums over every call of the frame-by-frame (decode) or chunked (encode) path."""

    conv_row: int  # 3x3 convs (stride 1): elements of one row of the padded input, C·(T + 2 time pad)·(W + 2)
    down_row: int  # the encoder's stride-2 convs: one row of [B·T, C, H + 1, W + 1], sent to the rank above only
    convs: int  # 3x3 conv calls: one halo exchange each
    attn_row: int  # mid-block attention calls: C·T·w elements of one latent row of its input (all-gathered)
    attn_flops: int  # the attention blocks' FLOPs: computed on the whole gathered map on every rank
    out_row: int  # output elements per latent row: decode [3, frames, 8 rows, W]; encode the latent [z, T, 1, w]


_ATTENTION = re.compile(r"mid_block\.attentions\.\d+$")


@functools.cache
def count_vae_traffic(kind: str, frames: int, height: int, width: int) -> VaeTraffic:
    """VaeTraffic of diffusers' AutoencoderKLWan (release widths) on meta: "decode" of a latent (frames, h, w)
    or "encode" of an RGB video (frames, height, width), through forward pre-hooks on its 3x3 convs and its
    attention blocks, sized as parallel/vae.py swaps halos: a causal conv's input after its cache and zero
    padding (T + 2 frames, W + 2 columns), an upsample's conv on [B·T, C, H + 2, W + 2], a downsample's
    stride-2 conv on its ZeroPad2d((0, 1, 0, 1)) output (the row below only)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanAttentionBlock,
        WanCausalConv3d,
    )

    sums = [0, 0, 0, 0]  # conv_row, down_row, convs, attn_row

    def conv_hook(mod, args):
        x = args[0]
        if isinstance(mod, WanCausalConv3d):  # [B, C, T, H, W]; (w, w, h, h, 2t, 0) padding
            pad = mod._padding
            sums[0] += x.shape[0] * x.shape[1] * (x.shape[2] + pad[4]) * (x.shape[4] + pad[0] + pad[1])
        elif mod.stride[0] == 1:  # an upsample's Conv2d(padding 1) on [B·T, C, H, W]
            sums[0] += x.shape[0] * x.shape[1] * (x.shape[3] + 2 * mod.padding[1])
        else:  # a downsample's stride-2 Conv2d, its input already zero-padded by one column and row
            sums[1] += x.shape[0] * x.shape[1] * x.shape[3]
        sums[2] += 1

    def attn_hook(mod, args):
        x = args[0]  # [B, C, T, h, w]
        sums[3] += x.shape[0] * x.shape[1] * x.shape[2] * x.shape[4]

    z = VaeArch().z_dim
    with torch.device("meta"):
        model = vae_module()
        part = model.decoder if kind == "decode" else model.encoder
        for mod in part.modules():
            if (isinstance(mod, WanCausalConv3d) and mod._padding[2] > 0) or \
                    (type(mod) is nn.Conv2d and mod.kernel_size[0] == 3):
                mod.register_forward_pre_hook(conv_hook)
            elif isinstance(mod, WanAttentionBlock):
                mod.register_forward_pre_hook(attn_hook)
        with FlopCounterMode(display=False) as counter:
            if kind == "decode":
                out = model.decode(torch.empty(1, z, frames, height, width)).sample  # [1, 3, T, 8h, 8w]
                out_row = out.shape[1] * out.shape[2] * (out.shape[3] // height) * out.shape[4]
            elif kind == "encode":
                mean = model.encode(torch.empty(1, 3, frames, height, width)).latent_dist.mean  # [1, z, T, h, w]
                out_row = mean.shape[1] * mean.shape[2] * mean.shape[4]
            else:
                raise ValueError(f"kind = {kind!r}: 'decode' or 'encode'")
    attn_flops = sum(sum(ops.values()) for key, ops in counter.get_flop_counts().items() if _ATTENTION.search(key))
    return VaeTraffic(*sums, attn_flops, out_row)


def _extrapolate(a: VaeTraffic, b: VaeTraffic, n: int) -> VaeTraffic:
    return VaeTraffic(*(x + n * (y - x) for x, y in zip(astuple(a), astuple(b))))


def decode_traffic(grid: tuple[int, int, int]) -> VaeTraffic:
    """Decode traffic; one latent frame per call, identical calls from the third on, so F frames are
    count(2) + (F-2)·(count(3) - count(2)), as vae_decode_flops (tested equal to a direct count)."""
    f, h, w = grid
    if f <= 3:
        return count_vae_traffic("decode", f, h, w)
    return _extrapolate(count_vae_traffic("decode", 2, h, w), count_vae_traffic("decode", 3, h, w), f - 2)


def encode_traffic(frames: int, height: int, width: int) -> VaeTraffic:
    """Encode traffic: one frame, then identical 4-frame chunks, extrapolated as vae_encode_flops."""
    k = (frames - 1) // 4
    if k <= 2:
        return count_vae_traffic("encode", frames, height, width)
    return _extrapolate(count_vae_traffic("encode", 5, height, width),
                        count_vae_traffic("encode", 9, height, width), k - 1)


@dataclass(frozen=True)
class VaeSplit:
    """One decode (or encode) split over `ranks` by latent rows: the largest band's share of the work and the
    bytes the busiest rank sends (an interior one; rank 0 receives the gather)."""

    ranks: int
    rows: int  # latent rows of the video
    max_rows: int  # the largest band (rank 0's: the first ranks take the remainder)
    halo_bytes: int  # before every 3x3 conv one padded row to each neighbour (2; 1 with 2 ranks), all channels
    attn_bytes: int  # the mid-block attention's all-gather: the largest band sent to each of the other ranks
    gather_bytes: int  # the output's bands, each padded to the largest: decode into rank 0, encode to every rank
    attn_flops: int  # computed whole on every rank (on the gathered map), not split
    convs: int  # halo exchanges (3x3 conv calls): their latency is not priced

    @property
    def fraction(self) -> float:
        """The largest band's share of the convolutions' work: max_rows / rows (not 1 / ranks)."""
        return self.max_rows / self.rows

    @property
    def comm_bytes(self) -> int:
        return self.halo_bytes + self.attn_bytes + self.gather_bytes

    def compute_flops(self, flops: int) -> float:
        """Of a decode (encode) of `flops` FLOPs, what the largest band's rank computes: the convolutions'
        share max_rows / rows, plus the whole mid-block attention."""
        if self.ranks == 1:
            return flops
        return (flops - self.attn_flops) * self.max_rows / self.rows + self.attn_flops


def vae_split(traffic: VaeTraffic, rows: int, ranks: int, dtype_bytes: int = VAE_BYTES) -> VaeSplit:
    """The split of a decode/encode whose traffic is `traffic` over `ranks` (1: not split, nothing moves).

    With m = max_band rows: halo = (min(2, P-1) · conv_row + down_row) · bytes; attention = (P-1) · m ·
    attn_row · bytes; gather = (P-1) · m · out_row · bytes (parallel/vae.py pads every band to m rows: rank 0
    receives P-1 of them, or every rank sends its band to the P-1 others).
    """
    if ranks == 1:
        return VaeSplit(1, rows, rows, 0, 0, 0, 0, 0)
    m = max_band(rows, ranks)
    return VaeSplit(ranks, rows, m, (min(2, ranks - 1) * traffic.conv_row + traffic.down_row) * dtype_bytes,
                    (ranks - 1) * m * traffic.attn_row * dtype_bytes, (ranks - 1) * m * traffic.out_row * dtype_bytes,
                    traffic.attn_flops, traffic.convs)


def decode_split(grid: tuple[int, int, int], ranks: int) -> VaeSplit:
    return vae_split(decode_traffic(grid) if ranks > 1 else VaeTraffic(0, 0, 0, 0, 0, 0), grid[1], ranks)


def encode_split(frames: int, height: int, width: int, rows: int, ranks: int) -> VaeSplit:
    traffic = encode_traffic(frames, height, width) if ranks > 1 else VaeTraffic(0, 0, 0, 0, 0, 0)
    return vae_split(traffic, rows, ranks)


def split_working_bytes(bytes_per_pixel: float, width: int, rows: int, ranks: int) -> int:
    """A rank's share (ranks > 1) of the decode working memory: the per-pixel constant over its band's
    output rows (8 per latent row) plus one halo row on each side."""
    return int(bytes_per_pixel * width * (8 * max_band(rows, ranks) + 2))


def gather_buffer_bytes(frames: int, height: int, width: int, rows: int, ranks: int,
                        dtype_bytes: int = VAE_BYTES) -> int:
    """Rank 0 while it gathers the video: its band, the P bands received (each padded to the largest) and
    their concatenation, the whole video [3, frames, H, W] (parallel/vae.py `_Band.gather`)."""
    band = 3 * frames * 8 * max_band(rows, ranks) * width * dtype_bytes
    return (1 + ranks) * band + video_bytes(frames, height, width, dtype_bytes)


def video_bytes(frames: int, height: int, width: int, dtype_bytes: int = VAE_BYTES) -> int:
    """The decoded video [3, frames, height, width], float32."""
    return 3 * frames * height * width * dtype_bytes
