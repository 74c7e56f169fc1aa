"""The Wan2.1 VAE split over a sequence-parallel group: each rank decodes (and encodes) one band of rows.

Why: after 4-step distillation the DiT is a third of a request and the VAE ran on rank 0 alone while the
other ranks waited. The VAE couples rows only in its 3x3 convolutions (norms are per pixel, upsampling is
nearest) and one small attention at latent resolution: so each 3x3 conv swaps one halo row with each
neighbour (its causal time cache is per band and travels in the conv's input), the attention gathers its
map, and rank 0 gathers the pixels. Every pixel's arithmetic is the whole-frame decoder's (to rounding).

`SplitVAE` has `WanVAE`'s interface, but its calls are collective: every rank calls them with the same input;
decode returns the video on rank 0 and None elsewhere. The diffusers modules are unchanged: the forwards that
couple rows are swapped only inside a call. Design and measurements: ARCHITECTURE.md (parallel/vae.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample

from model.archs import VAE_SPACE_STRIDE
from model.vae import StreamDecoder, WanVAE

__all__ = ["SplitVAE", "SplitStreamDecoder", "row_bands"]


def row_bands(rows: int, parts: int) -> list[tuple[int, int]]:
    """[a_r, b_r) for each of `parts` ranks: contiguous, the remainder one row each to the first ranks."""
    if parts > rows:
        raise ValueError(f"a {rows}-row latent cannot be split over {parts} ranks (each needs >= 1 row)")
    base, extra = divmod(rows, parts)
    out, a = [], 0
    for r in range(parts):
        b = a + base + (r < extra)
        out.append((a, b))
        a = b
    return out


class _Band:
    """This rank's band during one call: the group, the latent row counts of every rank, and the halo swap."""

    def __init__(self, pg, rank: int, size: int, bands: list[tuple[int, int]]):
        self.pg, self.rank, self.size = pg, rank, size
        self.rows = [b - a for a, b in bands]  # latent rows per rank
        self.halo_bytes = 0  # sent by this rank during the call

    def sizes(self, local: int) -> list[int]:
        """Every rank's row count at the level where this rank has `local` rows (same scale on every rank)."""
        scale, rest = divmod(local, self.rows[self.rank])
        if rest:
            raise RuntimeError(f"split VAE: {local} rows is not a multiple of this band's {self.rows[self.rank]}")
        return [n * scale for n in self.rows]

    def halo(self, x: torch.Tensor, dim: int, top: int, bottom: int) -> torch.Tensor:
        """x, zero-padded by `top` / `bottom` rows along dim already, with those rows filled in place from the
        ranks above / below (left zero at the frame's edges: the conv's own zero padding). One copy of x (the
        padding), not two: only the halo rows travel and are written."""
        ops, fills = [], []
        up, down = self.rank - 1, self.rank + 1
        n = x.shape[dim]
        if top and up >= 0:  # my top rows are the upper neighbour's last `top` real rows
            buf = torch.empty_like(x.narrow(dim, 0, top)).contiguous()
            ops.append(dist.P2POp(dist.irecv, buf, group=self.pg, group_peer=up))
            fills.append((0, buf))
        if bottom and down < self.size:
            buf = torch.empty_like(x.narrow(dim, 0, bottom)).contiguous()
            ops.append(dist.P2POp(dist.irecv, buf, group=self.pg, group_peer=down))
            fills.append((n - bottom, buf))
        if bottom and up >= 0:  # the upper neighbour's bottom halo: my first `bottom` real rows
            send = x.narrow(dim, top, bottom).contiguous()
            ops.append(dist.P2POp(dist.isend, send, group=self.pg, group_peer=up))
            self.halo_bytes += send.numel() * send.element_size()
        if top and down < self.size:  # the lower neighbour's top halo: my last `top` real rows
            send = x.narrow(dim, n - bottom - top, top).contiguous()
            ops.append(dist.P2POp(dist.isend, send, group=self.pg, group_peer=down))
            self.halo_bytes += send.numel() * send.element_size()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for start, buf in fills:
            x.narrow(dim, start, buf.shape[dim]).copy_(buf)
        return x

    def gather(self, x: torch.Tensor, dim: int, dst: int | None = None) -> torch.Tensor | None:
        """The bands of every rank concatenated along dim: on every rank (dst None) or on rank dst only."""
        sizes = self.sizes(x.shape[dim])
        top = max(sizes)
        pad = x if x.shape[dim] == top else torch.cat([x, x.new_zeros(_with(x.shape, dim, top - x.shape[dim]))], dim)
        pad = pad.contiguous()
        if dst is None:
            parts = [torch.empty_like(pad) for _ in range(self.size)]
            dist.all_gather(parts, pad, group=self.pg)
        else:
            parts = [torch.empty_like(pad) for _ in range(self.size)] if self.rank == dst else None
            dist.gather(pad, parts, group=self.pg, group_dst=dst)
            if self.rank != dst:
                return None
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


def _with(shape, dim: int, n: int) -> tuple[int, ...]:
    s = list(shape)
    s[dim] = n
    return tuple(s)


# ---- the forwards used inside a split call (mirroring diffusers', the H padding replaced by halo rows) ----
def _causal_conv(conv: WanCausalConv3d, band: _Band, x: torch.Tensor, cache_x=None) -> torch.Tensor:
    padding = list(conv._padding)  # (w, w, h, h, 2t, 0)
    if cache_x is not None and padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        padding[4] -= cache_x.shape[2]
    x = F.pad(x, padding)
    if padding[2]:
        x = band.halo(x, 3, padding[2], padding[3])
    return nn.Conv3d.forward(conv, x)


def _conv2d_same(conv: nn.Conv2d, band: _Band, x: torch.Tensor) -> torch.Tensor:
    """An upsample's 3x3 conv (padding 1, stride 1) on [(b t), c, h, w]."""
    ph, pw = conv.padding
    x = band.halo(F.pad(x, (pw, pw, ph, ph)), 2, ph, ph)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _down_pad(band: _Band, x: torch.Tensor) -> torch.Tensor:
    """A downsample's ZeroPad2d((0, 1, 0, 1)) before its stride-2 3x3 conv: the row below is the next band's
    first (bands start at even rows at every level: 8 pixel rows per latent row)."""
    return band.halo(F.pad(x, (0, 1, 0, 1)), 2, 0, 1)


def _attention(block: WanAttentionBlock, forward, band: _Band, x: torch.Tensor) -> torch.Tensor:
    """The mid block's per-frame spatial attention over the whole (latent-sized) map, this band kept."""
    start = sum(band.sizes(x.shape[3])[:band.rank])
    return forward(band.gather(x, 3)).narrow(3, start, x.shape[3])


def _swaps(model: nn.Module, band: _Band) -> list[tuple[nn.Module, object]]:
    """(module, forward) for every module whose forward couples rows; refuses a module it cannot split."""
    swaps, covered = [], set()
    for m in model.modules():
        if isinstance(m, WanCausalConv3d):
            kh, sh = m.kernel_size[1], m.stride[1]
            if kh != 2 * m._padding[2] + 1 or sh != 1:
                raise ValueError(f"split VAE: causal conv with kernel {m.kernel_size}, stride {m.stride}")
            swaps.append((m, lambda x, cache_x=None, m=m: _causal_conv(m, band, x, cache_x)))
            covered.add(m)
        elif isinstance(m, WanResample) and m.mode in ("upsample2d", "upsample3d"):
            conv = m.resample[1]
            swaps.append((conv, lambda x, c=conv: _conv2d_same(c, band, x)))
            covered.add(conv)
        elif isinstance(m, WanResample) and m.mode in ("downsample2d", "downsample3d"):
            swaps.append((m.resample[0], lambda x: _down_pad(band, x)))
            covered.update(m.resample)
        elif isinstance(m, WanAttentionBlock):
            swaps.append((m, lambda x, m=m, f=m.forward: _attention(m, f, band, x)))
            covered.update(m.modules())
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.kernel_size[-2] > 1 and m not in covered:
            raise ValueError(f"split VAE: {name} ({type(m).__name__}, kernel {m.kernel_size}) couples rows and "
                             f"has no split forward")
    return swaps


class SplitVAE(WanVAE):
    """A `WanVAE` whose encode / decode run over `pg` (every rank calls them alike; module docstring). pg None:
    the default group at the time of each call (so no reference keeps a torn-down group alive)."""

    def __init__(self, vae: WanVAE, pg, rank: int, size: int):
        self.model, self.mean, self.std = vae.model, vae.mean, vae.std
        self.vae, self.pg, self.rank, self.size = vae, pg, rank, size
        self.last_halo_bytes = 0
        self.calls = {"encode": 0, "decode": 0, "stream": 0}  # split calls so far (not the whole-frame ones)

    @contextlib.contextmanager
    def split(self, latent_rows: int) -> Iterator[tuple[_Band, tuple[int, int]]]:
        """Inside: the model's row-coupling forwards are the split ones for this rank's band."""
        bands = row_bands(latent_rows, self.size)
        band = _Band(self.pg, self.rank, self.size, bands)
        swaps = _swaps(self.model, band)
        for m, f in swaps:
            m.forward = f
        try:
            yield band, bands[self.rank]
        finally:
            for m, _ in swaps:
                del m.forward  # back to the class's forward
            self.last_halo_bytes = band.halo_bytes

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """`WanVAE.encode` over the group: every rank passes the whole video, every rank gets all latents."""
        h = video.shape[3] if video.dim() == 5 else 0
        if h % VAE_SPACE_STRIDE:
            return self.vae.encode(video)  # its own error
        if h // VAE_SPACE_STRIDE < self.size:  # fewer latent rows than ranks: every rank encodes it whole
            return self.vae.encode(video)
        self.calls["encode"] += 1
        with self.split(h // VAE_SPACE_STRIDE) as (band, (a, b)):
            s = VAE_SPACE_STRIDE
            local = self.vae.encode(video[:, :, :, a * s:b * s])
            return band.gather(local, 3)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, dst: int | None = 0) -> torch.Tensor | None:
        """`WanVAE.decode` over the group: the video on rank dst (None: on every rank), None elsewhere."""
        if latents.dim() != 5:
            return self.vae.decode(latents)  # its own error
        if latents.shape[3] < self.size:  # fewer rows than ranks: decoded whole where it is wanted
            return self.vae.decode(latents) if dst is None or dst == self.rank else None
        self.calls["decode"] += 1
        with self.split(latents.shape[3]) as (band, (a, b)):
            return band.gather(self.vae.decode(latents[:, :, :, a:b]), 3, dst)

    def stream_decoder(self) -> SplitStreamDecoder:
        return SplitStreamDecoder(self)


class SplitStreamDecoder(StreamDecoder):
    """`StreamDecoder` over the group: each rank keeps its band's causal cache; decode returns the frames on
    rank 0 and None elsewhere (a CausVid session keeps frames where there are some)."""

    def __init__(self, vae: SplitVAE):
        super().__init__(vae.vae)
        self.split_vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        if latents.dim() != 5 or latents.shape[3] < self.split_vae.size:  # every rank keeps the whole cache
            out = super().decode(latents)
            return out if self.split_vae.rank == 0 else None
        self.split_vae.calls["stream"] += 1
        with self.split_vae.split(latents.shape[3]) as (band, (a, b)):
            return band.gather(super().decode(latents[:, :, :, a:b]), 3, 0)

    @torch.no_grad()
    def resume(self, tail: torch.Tensor, start_frame: int) -> SplitStreamDecoder:
        if tail.dim() != 5 or tail.shape[3] < self.split_vae.size:
            return super().resume(tail, start_frame)
        with self.split_vae.split(tail.shape[3]) as (_, (a, b)):
            super().resume(tail[:, :, :, a:b], start_frame)
        return self
