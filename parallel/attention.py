"""Sequence-parallel self-attention (Ulysses x ring) and the token layout that shards a DiT forward.

The DiT asks its `TokenLayout` (model/attention.py) to shard the tokens, to attend, and to gather the output;
`SequenceParallelLayout` answers over an SP group of P = ulysses x ring ranks: shard (zero-pad to a multiple
of P, keep rank p's contiguous chunk), attend (Ulysses all-to-all, then ring attention merged by
log-sum-exp), gather. Padding keys are masked, so SP equals one process to fp32 round-off for every
length. `attend_segments` takes a list of K/V segments (CausVid: cache + current block). Local kernels:
the DiT's configured ones (model/kernels.py; merges need their log-sum-exp); `sp_backend` xfuser / yunchang
hands the bidirectional forward to their layers instead. ARCHITECTURE.md ("parallel") has the design.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.attention import TokenLayout
from model.kernels import SDPA, AttentionKernel, KernelError

from .group import Group, SubGroup, wait


# ------------------------------------------------------------------------------------------------
# Local kernels
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVSegment:
    """A segment of the key sequence: k, v [B, Lk, H, D] (under SP: this rank's contiguous chunk of it).

    valid: keys at (segment-global) index >= valid are padding. key_mask: bool [Lk] or [B, Lk] over the
    segment-global index, True = attend. Either, both or neither may be given.
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: int | None = None
    key_mask: torch.Tensor | None = None

    def block(self, start: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        """(k, v, mask) of the keys at segment-global positions [start, start + len), padding sliced off."""
        k = self.k if k is None else k
        v = self.v if v is None else v
        n = k.shape[1]
        if self.valid is not None:
            n = max(0, min(n, self.valid - start))
            k, v = k[:, :n], v[:, :n]
        mask = None
        if self.key_mask is not None:
            mask = self.key_mask[..., start:start + n]
        return k, v, mask


def merge_partial(acc, part):
    """Combine two softmax-normalised partial outputs over disjoint key sets by their log-sum-exps.

    acc, part: (out [B, L, H, D], lse [B, H, L]); acc may be None. Returns float32 (out, lse).
    """
    out_b, lse_b = part
    if acc is None:
        return out_b.float(), lse_b
    out_a, lse_a = acc
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0).transpose(1, 2)[..., None]  # -inf - -inf: no keys on either side
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    return out_a * w_a + out_b.float() * w_b, lse


def attend_segments(q: torch.Tensor, segments: list[KVSegment], kernel: AttentionKernel = SDPA,
                    start: int = 0) -> torch.Tensor:
    """Local attention of q over the concatenation of the segments' valid keys, with `kernel`.

    start: segment-global index of the first key held (0 when the segments are whole). One segment goes
    through the kernel's plain call (bit-identical to the single-process path); several are merged by
    log-sum-exp.
    """
    blocks = [b for b in (s.block(start) for s in segments) if b[0].shape[1] > 0]
    if not blocks:
        raise ValueError("attention over an empty key set (every key is masked)")
    if len(blocks) == 1:
        return kernel(q, *blocks[0][:2], key_mask=blocks[0][2])
    acc = None
    for k, v, mask in blocks:
        acc = merge_partial(acc, kernel.with_lse(q, k, v, mask))
    return acc[0].to(q.dtype)


# ------------------------------------------------------------------------------------------------
# Communication
# ------------------------------------------------------------------------------------------------
class CommStats:
    """Wall time spent inside collectives (waiting included) and bytes this rank sent: the share of a forward
    that is communication, and what it moved."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.seconds, self.calls, self.bytes_sent = 0.0, 0, 0

    def timed(self, fn, *args, sent: int = 0, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.bytes_sent += sent


def _global(group: SubGroup, index: int) -> int:
    return group.ranks[index % group.size]


class SequenceParallelAttention:
    """Ulysses x ring attention of local queries over local K/V segments (see the module docstring)."""

    def __init__(self, ulysses: SubGroup, ring: SubGroup, stats: CommStats | None = None, backend: str = "wanserve"):
        self.ulysses, self.ring = ulysses, ring
        self.stats = stats or CommStats()
        self.backend = backend
        self._usp = None  # xDiT's / yunchang's layer, built on the first CUDA forward

    @property
    def size(self) -> int:
        return self.ulysses.size * self.ring.size

    # ---- Ulysses all-to-all ----
    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        u = self.ulysses.size
        self.stats.timed(dist.all_to_all_single, out, x, group=self.ulysses.pg,
                         sent=x.numel() * x.element_size() * (u - 1) // u)
        return out

    def scatter_heads(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """[B, s_i, H, D] each -> [B, U*s_i, H/U, D] each, in one all-to-all."""
        u = self.ulysses.size
        if u == 1:
            return tensors
        b, _, h, d = tensors[0].shape
        lens = [t.shape[1] for t in tensors]
        packed = torch.cat([t.reshape(b, t.shape[1], u, h // u, d) for t in tensors], dim=1)
        recv = self._all_to_all(packed.permute(2, 0, 1, 3, 4).contiguous())  # [U(src), B, sum s, H/U, D]
        return [p.permute(1, 0, 2, 3, 4).reshape(b, u * n, h // u, d) for p, n in zip(recv.split(lens, dim=2), lens)]

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, U*s, H/U, D] -> [B, s, H, D] (the inverse of `scatter_heads`)."""
        u = self.ulysses.size
        if u == 1:
            return x
        b, us, hu, d = x.shape
        send = x.view(b, u, us // u, hu, d).permute(1, 0, 2, 3, 4).contiguous()  # [U(dst), B, s, H/U, D]
        recv = self._all_to_all(send)  # [U(src = head group), B, s, H/U, D]
        return recv.permute(1, 2, 0, 3, 4).reshape(b, us // u, u * hu, d)

    # ---- ring ----
    def _ring_attend(self, q: torch.Tensor, segments: list[KVSegment], kernel: AttentionKernel) -> torch.Tensor:
        """q [B, Lq, h, D] over the ring's K/V blocks; segment j of member m covers positions [m*n_j, (m+1)*n_j)."""
        ring = self.ring
        r, me = ring.size, ring.rank
        lens = [s.k.shape[1] for s in segments]
        buf = torch.cat([torch.stack([s.k, s.v.to(s.k.dtype)]) for s in segments], dim=2).contiguous()
        acc = None
        for step in range(r):
            src = (me - step) % r  # ring member whose K/V block we hold now
            reqs, nxt = [], None
            if step + 1 < r:
                nxt = torch.empty_like(buf)
                ops = [dist.P2POp(dist.isend, buf, _global(ring, me + 1), ring.pg),
                       dist.P2POp(dist.irecv, nxt, _global(ring, me - 1), ring.pg)]
                reqs = self.stats.timed(dist.batch_isend_irecv, ops, sent=buf.numel() * buf.element_size())
            for seg, kv in zip(segments, buf.split(lens, dim=2)):
                k, v, mask = seg.block(src * kv.shape[2], kv[0], kv[1])
                if k.shape[1]:
                    acc = merge_partial(acc, kernel.with_lse(q, k, v, mask))
            for req in reqs:
                self.stats.timed(wait, req)
            if nxt is not None:
                buf = nxt
        if acc is None:
            raise ValueError("attention over an empty key set (every key is masked)")
        return acc[0].to(q.dtype)

    # ---- entry point ----
    def __call__(self, q: torch.Tensor, segments: list[KVSegment], kernel: AttentionKernel = SDPA) -> torch.Tensor:
        """q [B, s, H, D] (this rank's chunk of the queries) over the segments (this rank's chunks of each).

        Chunks are contiguous and in SP-rank order: SP rank p holds positions [p*n, (p+1)*n) of a segment
        whose local length is n. Returns [B, s, H, D].
        """
        heads, u = q.shape[2], self.ulysses.size
        if heads % u:
            raise ValueError(f"Ulysses degree {u} must divide the number of attention heads ({heads}); use a "
                             "ring degree for the rest of the group")
        if self.backend != "wanserve" and self._usp_fits(q, segments):
            seg = segments[0]
            return self._usp_layer(kernel)(q, seg.k.to(q.dtype), seg.v.to(q.dtype))
        q, *kv = self.scatter_heads([q] + [t for s in segments for t in (s.k, s.v)])
        segs = [KVSegment(k, v, s.valid, s.key_mask) for s, k, v in zip(segments, kv[0::2], kv[1::2])]
        return self.gather_heads(self.attend_scattered(q, segs, kernel))

    def attend_scattered(self, q: torch.Tensor, segments: list[KVSegment],
                         kernel: AttentionKernel = SDPA) -> torch.Tensor:
        """After `scatter_heads`: q [B, n, H/U, D] over this ring member's segments (member m holds positions
        [m*n_j, (m+1)*n_j) of segment j); locally when the ring has one member."""
        if self.ring.size == 1:
            return attend_segments(q, segments, kernel)
        return self._ring_attend(q, segments, kernel)

    # ---- xDiT / yunchang (parallel.sp_backend) ----
    def _usp_fits(self, q: torch.Tensor, segments: list[KVSegment]) -> bool:
        """Their layers take whole, unpadded, unmasked sequences in half precision on CUDA: the bidirectional
        forward at a token count the group divides. Anything else (CausVid cache segments, padded lengths)
        runs wanserve's path with the same kernel (ARCHITECTURE.md, "parallel")."""
        seg = segments[0]
        return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and len(segments) == 1
                and seg.key_mask is None and (seg.valid is None or seg.valid >= self.size * seg.k.shape[1]))

    def _usp_layer(self, kernel: AttentionKernel):
        if self._usp is None:
            self._usp = load_usp(self.backend, kernel.name, self.ulysses, self.ring)
        return self._usp


USP_ATTN_TYPES = {"torch_sdpa": "TORCH_FLASH", "flash_attn2": "FA", "flash_attn3": "FA3", "sage_attn2": "SAGE_AUTO"}


def load_usp(backend: str, kernel: str, ulysses: SubGroup, ring: SubGroup, probe=None):
    """xFuserLongContextAttention or yunchang's LongContextAttention running `kernel`, bound to our groups
    (both read them from yunchang's globals when built). Any reason it cannot be built is a KernelError
    naming it: the configured backend runs, or the load fails. probe(module) -> installed? (tests)."""
    import importlib.util

    probe = probe or (lambda m: importlib.util.find_spec(m) is not None)
    where = f"parallel.sp_backend = {backend}"
    if backend not in ("xfuser", "yunchang"):
        raise KernelError(f"{where}: unknown backend (expected wanserve, xfuser or yunchang)")
    if not probe(backend):
        raise KernelError(f"{where}: the {backend} package is not installed (pip install -e \".[cuda]\")")
    if backend == "xfuser" and not probe("flash_attn"):  # xDiT's ring module imports flash_attn at import time
        raise KernelError(f"{where}: xDiT's long-context attention imports flash_attn, which is not installed; "
                          "install flash-attn or use sp_backend = yunchang / wanserve")
    import yunchang.globals as yg
    from yunchang.kernels import AttnType

    attn_type = getattr(AttnType, USP_ATTN_TYPES[kernel])
    yg.PROCESS_GROUP.ULYSSES_PG, yg.PROCESS_GROUP.RING_PG = ulysses.pg, ring.pg
    if backend == "xfuser":
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention

        layer = xFuserLongContextAttention(ring_impl_type="basic", attn_type=attn_type)
        call = lambda q, k, v: layer(None, q, k, v)  # noqa: E731 (xDiT's forward takes `attn` first)
    else:
        from yunchang import LongContextAttention

        layer = call = LongContextAttention(ring_impl_type="basic", attn_type=attn_type)
    layer.ulysses_pg, layer.ring_pg = ulysses.pg, ring.pg
    return call


# ------------------------------------------------------------------------------------------------
# The token layout
# ------------------------------------------------------------------------------------------------
def padded_length(length: int, parts: int) -> int:
    return -(-length // parts) * parts


class SequenceParallelLayout(TokenLayout):
    """Tokens of every DiT forward sharded over the SP group of `group` (see the module docstring).

    `shard` records the global token count of the forward (dit.py shards tokens, RoPE and modulation of one
    forward with the same length), which `self_attention` masks against.
    """

    sharded = True

    def __init__(self, group: Group, stats: CommStats | None = None, backend: str = "wanserve"):
        self.sp = group.sp
        self.stats = stats or CommStats()
        self.attn = SequenceParallelAttention(group.ulysses, group.ring, self.stats, backend)
        self.length: int | None = None

    @property
    def size(self) -> int:
        return self.sp.size

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        self.length = length
        lp = padded_length(length, self.size)
        if lp != length:
            x = torch.cat([x, x.new_zeros((x.shape[0], lp - length, *x.shape[2:]))], dim=1)
        s = lp // self.size
        return x[:, self.sp.rank * s:(self.sp.rank + 1) * s].contiguous()

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.stats.timed(dist.all_gather, parts, x, group=self.sp.pg,
                         sent=x.numel() * x.element_size() * (self.size - 1))
        return torch.cat(parts, dim=1)[:, :length]

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kernel: AttentionKernel = SDPA) -> torch.Tensor:
        if self.length is None:
            raise RuntimeError("SequenceParallelLayout.self_attention before shard(): the global length is unknown")
        return self.attn(q, [KVSegment(k, v, valid=self.length)], kernel)
