"""Sequence-parallel self-attention (Ulysses x ring) and the token layout that shards a DiT forward.

The DiT asks its `TokenLayout` (model/attention.py) to shard the tokens, to attend, and to gather the output;
`SequenceParallelLayout` answers over an SP group of P = ulysses x ring ranks: shard (zero-pad to a multiple
of P, keep rank p's contiguous chunk), attend (Ulysses all-to-all, then ring attention merged by
log-sum-exp), gather. Padding keys are masked, so SP equals one process to fp32 round-off for every
length. `attend_segments` takes a list of K/V segments (CausVid: cache + current block). Kernels: torch's
CPU flash attention (it returns the lse); on CUDA, xDiT's / yunchang's when they fit. ARCHITECTURE.md
("parallel") has the design.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.attention import TokenLayout, attention

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


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
    """Attention of q [B, Lq, H, D] over k, v [B, Lk, H, D] -> (out [B, Lq, H, D] in q's dtype,
    lse [B, H, Lq] float32). A sample whose keys are all masked gets out 0 and lse -inf (it adds nothing
    when merged)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v.to(q.dtype)))
    kt = kt.to(q.dtype)
    bias = None
    if key_mask is not None:
        shape = (-1, 1, 1, key_mask.shape[-1]) if key_mask.dim() == 2 else (1, 1, 1, -1)
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, -math.inf)
        bias = bias.view(shape)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, attn_mask=bias)
    elif q.is_cuda and bias is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        out, lse = _math_attention_lse(qt, kt, vt, bias)
    out, lse = out.transpose(1, 2), lse.float()
    if key_mask is not None:
        empty = ~key_mask.any(-1).view(-1)  # [B] or [1]: no key at all for that sample
        if bool(empty.any()):
            out = out.masked_fill(empty.view(-1, 1, 1, 1), 0.0)
            lse = lse.masked_fill(empty.view(-1, 1, 1), -math.inf)
    return out, lse


def _math_attention_lse(q, k, v, bias, chunk: int = 1024):
    """Exact attention with log-sum-exp on [B, H, L, D], in float32, a chunk of queries at a time."""
    outs, lses = [], []
    scale = q.shape[-1] ** -0.5
    for i in range(0, q.shape[2], chunk):
        s = (q[:, :, i:i + chunk].float() @ k.float().transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.float()
        lse = torch.logsumexp(s, dim=-1)
        outs.append((torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


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


def attend_segments(q: torch.Tensor, segments: list[KVSegment], start: int = 0) -> torch.Tensor:
    """Local attention of q over the concatenation of the segments' valid keys.

    start: segment-global index of the first key held (0 when the segments are whole). One segment goes
    through the DiT's own attention function (bit-identical to the single-process path); several are
    merged by log-sum-exp.
    """
    blocks = [b for b in (s.block(start) for s in segments) if b[0].shape[1] > 0]
    if not blocks:
        raise ValueError("attention over an empty key set (every key is masked)")
    if len(blocks) == 1:
        return attention(q, *blocks[0][:2], key_mask=blocks[0][2])
    acc = None
    for k, v, mask in blocks:
        acc = merge_partial(acc, attention_lse(q, k, v, mask))
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

    def __init__(self, ulysses: SubGroup, ring: SubGroup, stats: CommStats | None = None, use_fast_cuda: bool = True):
        self.ulysses, self.ring = ulysses, ring
        self.stats = stats or CommStats()
        self.use_fast_cuda = use_fast_cuda
        self._fast = None

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
    def _ring_attend(self, q: torch.Tensor, segments: list[KVSegment]) -> torch.Tensor:
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
                    acc = merge_partial(acc, attention_lse(q, k, v, mask))
            for req in reqs:
                self.stats.timed(wait, req)
            if nxt is not None:
                buf = nxt
        if acc is None:
            raise ValueError("attention over an empty key set (every key is masked)")
        return acc[0].to(q.dtype)

    # ---- entry point ----
    def __call__(self, q: torch.Tensor, segments: list[KVSegment]) -> torch.Tensor:
        """q [B, s, H, D] (this rank's chunk of the queries) over the segments (this rank's chunks of each).

        Chunks are contiguous and in SP-rank order: SP rank p holds positions [p*n, (p+1)*n) of a segment
        whose local length is n. Returns [B, s, H, D].
        """
        heads, u = q.shape[2], self.ulysses.size
        if heads % u:
            raise ValueError(f"Ulysses degree {u} must divide the number of attention heads ({heads}); use a "
                             "ring degree for the rest of the group")
        fast = self._fast_cuda(q, segments)
        if fast is not None:
            return fast
        q, *kv = self.scatter_heads([q] + [t for s in segments for t in (s.k, s.v)])
        segs = [KVSegment(k, v, s.valid, s.key_mask) for s, k, v in zip(segments, kv[0::2], kv[1::2])]
        return self.gather_heads(self.attend_scattered(q, segs))

    def attend_scattered(self, q: torch.Tensor, segments: list[KVSegment]) -> torch.Tensor:
        """After `scatter_heads`: q [B, n, H/U, D] over this ring member's segments (member m holds positions
        [m*n_j, (m+1)*n_j) of segment j); locally when the ring has one member."""
        if self.ring.size == 1:
            return attend_segments(q, segments)
        return self._ring_attend(q, segments)

    # ---- CUDA fast path ----
    def _fast_cuda(self, q: torch.Tensor, segments: list[KVSegment]):
        """xDiT/yunchang kernels: CUDA, half precision, one segment, nothing to mask."""
        if not (self.use_fast_cuda and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and len(segments) == 1 and segments[0].key_mask is None
                and (segments[0].valid is None or segments[0].valid >= self.size * segments[0].k.shape[1])):
            return None
        if self._fast is None:
            self._fast = _load_cuda_usp(self.ulysses, self.ring)
        if self._fast is False:
            return None
        seg = segments[0]
        return self._fast(q, seg.k.to(q.dtype), seg.v.to(q.dtype))


def _load_cuda_usp(ulysses: SubGroup, ring: SubGroup):
    """xFuserLongContextAttention, else yunchang's LongContextAttention, bound to our groups (both read the
    groups from yunchang's globals when built); False when neither can be used (then: our own path)."""
    import importlib.util
    import logging

    log = logging.getLogger(__name__)
    try:
        import yunchang.globals as yg
        from yunchang.kernels import AttnType
    except ImportError:
        log.info("yunchang is not installed: CUDA sequence parallelism uses parallel.attention's own kernels")
        return False
    yg.PROCESS_GROUP.ULYSSES_PG, yg.PROCESS_GROUP.RING_PG = ulysses.pg, ring.pg
    attn_type = AttnType.FA if importlib.util.find_spec("flash_attn") else AttnType.TORCH_FLASH
    candidates = []
    if importlib.util.find_spec("xfuser"):
        def xdit():
            from xfuser.core.long_ctx_attention import xFuserLongContextAttention

            layer = xFuserLongContextAttention(ring_impl_type="basic", attn_type=attn_type)
            return layer, lambda q, k, v: layer(None, q, k, v)  # xDiT's forward takes `attn` first
        candidates.append(("xfuser", xdit))

    def yc():
        from yunchang import LongContextAttention

        layer = LongContextAttention(ring_impl_type="basic", attn_type=attn_type)
        return layer, layer
    candidates.append(("yunchang", yc))
    for name, make in candidates:
        try:
            layer, call = make()
        except Exception as e:
            log.warning("%s long-context attention unavailable (%s); trying the next kernel", name, e)
            continue
        layer.ulysses_pg, layer.ring_pg = ulysses.pg, ring.pg
        log.info("CUDA sequence parallelism: %s LongContextAttention (%s)", name, attn_type.name)
        return call
    return False


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

    def __init__(self, group: Group, stats: CommStats | None = None, use_fast_cuda: bool = True):
        self.sp = group.sp
        self.stats = stats or CommStats()
        self.attn = SequenceParallelAttention(group.ulysses, group.ring, self.stats, use_fast_cuda)
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

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.length is None:
            raise RuntimeError("SequenceParallelLayout.self_attention before shard(): the global length is unknown")
        return self.attn(q, [KVSegment(k, v, valid=self.length)])
