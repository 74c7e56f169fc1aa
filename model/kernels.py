"""Attention kernels by LightX2V's names (`self_attn_1_type`, `cross_attn_1_type`, `cross_attn_2_type`).

A configured kernel is used, or loading fails naming what is missing (package, CUDA, GPU generation,
dtype); nothing falls back quietly to another kernel. Every kernel takes [B, L, H, D] tensors and an
optional boolean key mask; `with_lse` also returns the log-sum-exp that ring attention and the CausVid
cache segments merge by (parallel/attention.py). The kernel in use is reported per replica (/healthz).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .validation import ConfigError

# LightX2V's config keys, the DiT attention each one selects
KERNEL_KEYS = {"self_attn_1_type": "self-attention", "cross_attn_1_type": "text cross-attention",
               "cross_attn_2_type": "image cross-attention (i2v)"}
DEFAULT_KERNEL = "torch_sdpa"
# names LightX2V knows that wanserve does not implement, and why
_NOT_IMPLEMENTED = {
    "radial_attn": "sparse (Radial) attention changes the model's outputs; wanserve serves dense attention",
    "sparge_ckpt": "Sparge attention needs its post-trained weights; not implemented",
    "svg_attn": "sparse (SVG) attention is not implemented", "svg2_attn": "sparse (SVG2) attention is not implemented",
    "nbhd_attn": "sparse (neighbourhood) attention is not implemented",
    "spassage_attn": "sparse Sage attention is not implemented",
    "sage_attn3": "SageAttention 3 (Blackwell FP4) is not implemented; use sage_attn2",
    "ulysses": "Ulysses is a sequence-parallel scheme, set parallel.seq_p_attn_type", "ring": "ring is a "
    "sequence-parallel scheme, set parallel.seq_p_attn_type",
}


class KernelError(ConfigError):
    """A configured attention kernel cannot run here (missing package, device, GPU or dtype)."""


@dataclass(frozen=True)
class AttentionKernel:
    """One attention implementation. attend(q, k, v, key_mask) -> out; attend_lse -> (out, lse [B, H, Lq] fp32)."""

    name: str
    attend: Callable[..., torch.Tensor]
    attend_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None

    def __call__(self, q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(q, k, v, key_mask)

    @property
    def has_lse(self) -> bool:
        return self.attend_lse is not None

    def with_lse(self, q, k, v, key_mask: torch.Tensor | None = None):
        if self.attend_lse is None:
            raise KernelError(f"attention kernel {self.name} returns no log-sum-exp, which ring attention and the "
                              "CausVid cache segments need; configure flash_attn2, flash_attn3 or torch_sdpa")
        return self.attend_lse(q, k, v, key_mask)


# --------------------------------------------------------------------------------------------------
# torch SDPA (every device and dtype)
# --------------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, L, H, D] tensors (scale 1/sqrt(D)), in the dtype of q.

    key_mask: bool [B, Lk] (or [Lk]), True = attend; attn_mask: a dense bool [Lq, Lk] mask (the block-causal
    training forward). At most one of them."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v.to(q.dtype)))
    mask = None
    if key_mask is not None:
        mask = key_mask.view(-1, 1, 1, key_mask.shape[-1]) if key_mask.dim() == 2 else key_mask.view(1, 1, 1, -1)
    if attn_mask is not None:
        if mask is not None:
            raise ValueError("attention: pass key_mask or attn_mask, not both")
        mask = attn_mask[None, None]
    out = F.scaled_dot_product_attention(qt, kt.to(q.dtype), vt, attn_mask=mask)
    return out.transpose(1, 2)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
    """Attention of q [B, Lq, H, D] over k, v [B, Lk, H, D] -> (out in q's dtype, lse [B, H, Lq] float32).
    A sample whose keys are all masked gets out 0 and lse -inf (it adds nothing when merged)."""
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
    return _empty_samples(out, lse, key_mask)


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


def _empty_samples(out, lse, key_mask):
    if key_mask is not None:
        empty = ~key_mask.any(-1).view(-1)  # [B] or [1]: no key at all for that sample
        if bool(empty.any()):
            out = out.masked_fill(empty.view(-1, 1, 1, 1), 0.0)
            lse = lse.masked_fill(empty.view(-1, 1, 1), -math.inf)
    return out, lse


SDPA = AttentionKernel("torch_sdpa", lambda q, k, v, m=None: attention(q, k, v, key_mask=m), attention_lse)


# --------------------------------------------------------------------------------------------------
# CUDA kernels: flash-attention 2 / 3, SageAttention 2 (no mask support: masked keys are dropped first)
# --------------------------------------------------------------------------------------------------
def _per_sample(fn, q, k, v, key_mask, lse: bool):
    """fn(q, k, v) -> out or (out, lse) over only the attended keys (the kernels take no mask)."""
    if key_mask is None:
        return fn(q, k, v)
    if key_mask.dim() == 1 and bool(key_mask.any()):  # one mask for the whole batch
        return fn(q, k[:, key_mask], v[:, key_mask])
    masks = key_mask.view(1, -1).expand(q.shape[0], -1) if key_mask.dim() == 1 else key_mask
    outs, lses = [], []
    for i in range(q.shape[0]):
        keep = masks[i]
        qi = q[i:i + 1]
        if not bool(keep.any()):
            outs.append(torch.zeros_like(qi))
            lses.append(torch.full((1, q.shape[2], q.shape[1]), -math.inf, device=q.device))
            continue
        res = fn(qi, k[i:i + 1, keep], v[i:i + 1, keep])
        outs.append(res[0] if lse else res)
        if lse:
            lses.append(res[1].float())
    return (torch.cat(outs), torch.cat(lses)) if lse else torch.cat(outs)


def _flash2():
    from flash_attn import flash_attn_func

    def lse(q, k, v):
        out, lse_, _ = flash_attn_func(q, k.to(q.dtype), v.to(q.dtype), return_attn_probs=True)
        return out, lse_.float()
    return (lambda q, k, v, m=None: _per_sample(lambda a, b, c: flash_attn_func(a, b.to(a.dtype), c.to(a.dtype)),
                                                q, k, v, m, False),
            lambda q, k, v, m=None: _per_sample(lse, q, k, v, m, True))


def _flash3():
    import flash_attn_interface as fa3

    def call(q, k, v):  # releases differ: out, or (out, lse)
        res = fa3.flash_attn_func(q, k.to(q.dtype), v.to(q.dtype), return_attn_probs=True)
        return (res[0], res[1].float()) if isinstance(res, tuple) else (res, None)

    def lse(q, k, v):
        out, l_ = call(q, k, v)
        if l_ is None:
            raise KernelError("this flash_attn_interface release returns no log-sum-exp; upgrade FlashAttention-3")
        return out, l_
    return (lambda q, k, v, m=None: _per_sample(lambda a, b, c: call(a, b, c)[0], q, k, v, m, False),
            lambda q, k, v, m=None: _per_sample(lse, q, k, v, m, True))


def _sage2():
    from sageattention import sageattn

    def one(q, k, v):
        return sageattn(q, k.to(q.dtype), v.to(q.dtype), tensor_layout="NHD", is_causal=False)
    return lambda q, k, v, m=None: _per_sample(one, q, k, v, m, False), None


@dataclass(frozen=True)
class _Spec:
    module: str  # the package that provides it
    install: str
    min_capability: tuple[int, int]
    build: Callable[[], tuple]


_CUDA_KERNELS = {
    "flash_attn2": _Spec("flash_attn", "pip install flash-attn (FlashAttention-2)", (8, 0), _flash2),
    "flash_attn3": _Spec("flash_attn_interface", "build FlashAttention-3 from flash-attention/hopper", (9, 0),
                         _flash3),
    "sage_attn2": _Spec("sageattention", "pip install sageattention (SageAttention 2)", (8, 0), _sage2),
}
KERNEL_NAMES = (DEFAULT_KERNEL, *_CUDA_KERNELS)


def check_kernel_name(name: str) -> str:
    """The name itself if wanserve knows it; ValueError otherwise (for config validation)."""
    if name in KERNEL_NAMES:
        return name
    if name in _NOT_IMPLEMENTED:
        raise ValueError(f"{name!r}: {_NOT_IMPLEMENTED[name]}; wanserve runs {', '.join(KERNEL_NAMES)}")
    raise ValueError(f"unknown attention kernel {name!r}: expected one of {', '.join(KERNEL_NAMES)}")


def resolve_kernel(name: str, device: torch.device | str, dtype: torch.dtype, key: str = "self_attn_1_type",
                   probe: Callable[[str], bool] | None = None) -> AttentionKernel:
    """The kernel `name` built for `device` and `dtype`, or KernelError saying what is missing.

    probe(module) -> installed? (default: importlib's find_spec; tests pass their own)."""
    check_kernel_name(name)
    if name == DEFAULT_KERNEL:
        return SDPA
    spec, device = _CUDA_KERNELS[name], torch.device(device)
    where = f"{key} = {name}"
    if device.type != "cuda":
        raise KernelError(f"{where}: needs a CUDA GPU; this model loads on {device.type} (set {key} = torch_sdpa)")
    if dtype not in (torch.float16, torch.bfloat16):
        raise KernelError(f"{where}: runs in float16/bfloat16; the model computes in {dtype} (load it in bf16 or set "
                          f"{key} = torch_sdpa)")
    cap = torch.cuda.get_device_capability(device)
    if cap < spec.min_capability:
        raise KernelError(f"{where}: needs a GPU of compute capability {spec.min_capability[0]}."
                          f"{spec.min_capability[1]} or newer; {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    installed = probe(spec.module) if probe else importlib.util.find_spec(spec.module) is not None
    if not installed:
        raise KernelError(f"{where}: the {spec.module} package is not installed ({spec.install}), or set {key} = "
                          "torch_sdpa")
    attend, attend_lse = spec.build()
    return AttentionKernel(name, attend, attend_lse)


@dataclass(frozen=True)
class DiTKernels:
    """The kernels of one DiT: self-attention, text cross-attention, image cross-attention."""

    self_attn: AttentionKernel = SDPA
    cross_text: AttentionKernel = SDPA
    cross_image: AttentionKernel = SDPA

    def names(self) -> dict[str, str]:
        """{config key: kernel name}: what /healthz and /v1/models report."""
        return dict(zip(KERNEL_KEYS, (self.self_attn.name, self.cross_text.name, self.cross_image.name)))


def resolve_kernels(names: dict[str, str], device, dtype: torch.dtype, probe=None) -> DiTKernels:
    """DiTKernels from {config key: name} (missing keys: torch_sdpa); the first unavailable one raises."""
    built = [resolve_kernel(names.get(key) or DEFAULT_KERNEL, device, dtype, key, probe) for key in KERNEL_KEYS]
    return DiTKernels(*built)
