"""Int8 / fp8 linears (DiT, umT5, CLIP), LightX2V's pre-quantized Wan DiT files, and scaled fp8 GEMMs.

Wan 14B is 28.6 GB in bf16; LightX2V users run it with the transformer blocks' linears in 8 bits
(`dit_quantized`, `dit_quant_scheme` = "int8-vllm", "fp8-sgl", ..., `dit_quantized_ckpt`), which halves the
DiT and lets it fit next to T5, CLIP and the VAE. Symmetric per-output-channel scales, LightX2V's layout
and layer choice. A QuantLinear dequantizes and multiplies in its compute dtype (the only error is the
weight rounding), unless its fp8 weights run torch._scaled_mm with per-token activation scales
(`set_fp8_compute`; `dit_fp8_compute` "auto" does on GPUs with fp8 tensor cores): twice the bf16 peak,
the activations rounded to e4m3 too. The file format and the numerics: ARCHITECTURE.md.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError
from .config import QUANT_SCHEMES
from .dit import WanModel
from .validation import ConfigError

# --------------------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------------------
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}  # 448 = torch.finfo(torch.float8_e4m3fn).max
ABSMAX_FLOOR = 1e-5  # LightX2V's clamp on a row's absmax: a zero row gets a tiny scale, not 0/0
_UNSUPPORTED = {"fp8-pertensor": "one scale per tensor", "fp8-b128": "128x128 block scales"}


def normalize_scheme(scheme: str) -> str:
    """"int8", "int8-vllm", "int8-q8f", ... -> "int8"; "fp8", "fp8-sgl", "fp8-vllm", ... -> "fp8".

    The suffix names LightX2V's GEMM kernel; the weights (per-channel int8 / fp8 e4m3) are the same for all.
    """
    s = scheme.strip().lower() if isinstance(scheme, str) else ""
    for prefix, why in _UNSUPPORTED.items():
        if s.startswith(prefix):
            raise ValueError(f"quant scheme {scheme!r} stores {why}; wanserve loads per-output-channel int8/fp8 "
                             f"weights only (e.g. int8-vllm, fp8-sgl)")
    for base in QUANT_SCHEMES:
        if s == base or s.startswith(base + "-"):
            return base
    raise ValueError(f"unknown quant scheme {scheme!r}: expected one of the prefixes "
                     f"{', '.join(b + '-*' for b in QUANT_SCHEMES)} (e.g. int8-vllm, int8-q8f, fp8-sgl, fp8-vllm)")


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 / float8_e4m3fn [out, in], fp32 scale [out, 1]), symmetric per row."""
    scheme = normalize_scheme(scheme)
    if w.dim() != 2:
        raise ValueError(f"can only quantize 2-D weights; got shape {tuple(w.shape)}")
    if scheme == "fp8":
        return fp8_rows(w.detach().to(torch.float32))
    qmax = QMAX[scheme]
    w = w.detach().to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=ABSMAX_FLOOR) / qmax
    return (w / scale).round().clamp(-qmax, qmax).to(torch.int8), scale


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, k] -> (float8_e4m3fn [rows, k], fp32 scale [rows, 1]): symmetric per row, scale = absmax / 448.

    One formula for the weights (per output channel) and, on the scaled-GEMM path, the activations (per
    token), so that one outlier row never costs the others their precision. Arithmetic in fp32 whatever x's
    dtype (a bf16 x is read as is, not copied to fp32 first). The cast rounds to nearest even; clamp first
    (e4m3fn has no inf: an overflow would be NaN)."""
    qmax = QMAX["fp8"]
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp_(min=ABSMAX_FLOOR) / qmax
    return torch.div(x, scale).clamp_(-qmax, qmax).to(torch.float8_e4m3fn), scale


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Int8/fp8 linear. State dict: `weight` (int8/fp8 [out, in]), `weight_scale` (fp32 [out, 1]), `bias`
    (compute dtype). Dequantizes and multiplies in the compute dtype (input cast to it, like model.dit.Linear),
    or, for fp8 with `fp8_compute` = "scaled_mm" (set by `set_fp8_compute`), quantizes the input per token
    and runs torch._scaled_mm; the output is in the compute dtype either way.

    The compute dtype is the bias dtype (model.to(dtype) moves it); `.to(dtype)` / `.half()` never touch the
    8-bit weight or the fp32 scale (see _apply).
    """

    fp8_compute = "dequant"  # per layer, by set_fp8_compute; not state: .to() and the state dict ignore it

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "int8",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.scheme = normalize_scheme(scheme)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=QDTYPE[self.scheme],
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dtype = dtype  # compute dtype when there is no bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> QuantLinear:
        """Quantize an nn.Linear (on its device, meta included); the bias stays in the linear's dtype."""
        dtype, device = linear.weight.dtype, linear.weight.device
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, dtype, device)
        q.weight, q.weight_scale = quantize_weight(linear.weight, q.scheme)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self._dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q * scale in fp32, rounded once to dtype (default: the compute dtype)."""
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if self.fp8_compute == "scaled_mm":
            return self._scaled_mm(x, dtype)
        if x.is_cuda:  # dequantize in the compute dtype: fewer bytes moved (ARCHITECTURE.md)
            w = self.weight.to(dtype) * self.weight_scale.to(dtype)
        else:
            w = self.dequantize(dtype)
        return F.linear(x.to(dtype), w, self.bias)

    def _scaled_mm(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (any leading shape) quantized per token, one fp8 GEMM with both row-wise scales applied to its
        fp32 accumulator, bias added in the compute dtype. CUDA's row-wise kernels write bf16 only."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features, dtype=dtype)
        xq, xs = fp8_rows(x2)  # row-major codes (CUDA wants them so; the weight's .t() is column-major)
        out_dtype = torch.bfloat16 if x.is_cuda else dtype
        y = torch._scaled_mm(xq.contiguous(), self.weight.t(), scale_a=xs, scale_b=self.weight_scale.reshape(1, -1),
                             out_dtype=out_dtype).to(dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) converts every floating buffer, fp8 included: keep the 8-bit weight and the fp32
        # scale as they are and take only the device from fn. (Without a bias the compute dtype stays the
        # one given at construction; every Wan linear has a bias.)
        kept = {"weight": self.weight, "weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}")


# --------------------------------------------------------------------------------------------------
# Which linears (LightX2V's wan_dit rule)
# --------------------------------------------------------------------------------------------------
QUANT_TARGETS = ("self_attn", "cross_attn", "ffn")  # blocks.N.<target>.* ; LightX2V converter key_idx=2


def is_quantized_name(name: str) -> bool:
    """True for the module names LightX2V quantizes: blocks.N.{self_attn,cross_attn,ffn}.<linear>."""
    parts = name.split(".")
    return len(parts) >= 4 and parts[0] == "blocks" and parts[2] in QUANT_TARGETS


def quantized_names(model: nn.Module) -> list[str]:
    """Names of the linears quantize_dit replaces (or already replaced), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and is_quantized_name(n)]


def quantize_linears(model: nn.Module, names: Iterable[str], scheme: str,
                     wrap: Callable[[QuantLinear], nn.Module] | None = None) -> nn.Module:
    """Replace the named linears of model by QuantLinear (weight-only, per output row), in place.

    wrap(q): what to put in the linear's place instead of q itself (a holder for library code that reads the
    linear's `.weight`, see model/encoders.py). Already-quantized layers of the same scheme are kept."""
    scheme = normalize_scheme(scheme)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, QuantLinear):
            if old.scheme != scheme:
                raise ValueError(f"{name} is already quantized as {old.scheme}; cannot re-quantize to {scheme}")
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not a linear layer")
        q = QuantLinear.from_linear(old, scheme)
        setattr(parent, child, wrap(q) if wrap else q)
    return model


def quantize_dit(model: WanModel, scheme: str) -> WanModel:
    """Replace the blocks' attention and FFN linears by QuantLinear, in place; returns the model."""
    return quantize_linears(model, quantized_names(model), scheme)


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in LightX2V's layout (official names, X.weight int8/fp8 + X.weight_scale), on CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once); works on the meta device."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# Which GEMM the fp8 layers run (`dit_fp8_compute`)
# --------------------------------------------------------------------------------------------------
FP8_COMPUTE = ("auto", "scaled_mm", "dequant")
SCALED_MM_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
SCALED_MM_ALIGN = 16  # torch._scaled_mm on CUDA: in and out features multiples of 16 (CPU: any)


def cuda_capability(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of a CUDA device: the one fact the mode choice reads (tests patch it)."""
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


def scaled_mm_unsupported(device: str | torch.device) -> str | None:
    """Why torch._scaled_mm cannot run fp8 GEMMs on device, or None where it can (CPU: yes, slowly)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"scaled fp8 GEMMs are not supported on {device.type} devices"
    name, cap = cuda_capability(device)
    if tuple(cap) < SCALED_MM_MIN_CAPABILITY:
        return (f"{name} has compute capability {cap[0]}.{cap[1]}; fp8 GEMMs need "
                f"{'.'.join(map(str, SCALED_MM_MIN_CAPABILITY))} or newer (Ada, Hopper)")
    return None


def check_fp8_compute(mode: str, device: str | torch.device) -> None:
    """A ConfigError for a mode that cannot run on device (an unknown mode; "scaled_mm" where torch._scaled_mm
    cannot run); the loader calls it before reading any weight, so a bad config fails fast."""
    if mode not in FP8_COMPUTE:
        raise ConfigError(f"dit_fp8_compute = {mode!r}: choose from {', '.join(FP8_COMPUTE)}")
    why = scaled_mm_unsupported(device) if mode == "scaled_mm" else None
    if why:
        raise ConfigError(f"dit_fp8_compute = 'scaled_mm': {why}; use 'auto' or 'dequant'")


def _misaligned(layer: QuantLinear, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    bad = [f"{k} = {v}" for k, v in (("in_features", layer.in_features), ("out_features", layer.out_features))
           if v % SCALED_MM_ALIGN]
    return f"{', '.join(bad)}: not a multiple of {SCALED_MM_ALIGN} (torch._scaled_mm on CUDA)" if bad else None


def _fp8_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.scheme == "fp8"]


def set_fp8_compute(model: nn.Module, mode: str, device: str | torch.device) -> str | None:
    """Set every fp8 QuantLinear of model to scaled fp8 GEMMs or dequantization; returns fp8_compute_mode.

    "auto": scaled where device is CUDA with fp8 tensor cores, each layer whose shape the kernel cannot take
    left on dequant ("mixed: ..."); "scaled_mm": every layer, else a ConfigError naming the GPU or the layer
    (the model is left as it was); "dequant": today's weight-only path. Int8 layers are never touched."""
    check_fp8_compute(mode, device)
    device, layers = torch.device(device), _fp8_layers(model)
    if not layers:
        if mode == "scaled_mm":
            raise ConfigError("dit_fp8_compute = 'scaled_mm': the model has no fp8 layers")
        return None
    use = mode == "scaled_mm" or (mode == "auto" and device.type == "cuda" and scaled_mm_unsupported(device) is None)
    plan = {}
    for name, layer in layers:
        problem = _misaligned(layer, device) if use else None
        if problem and mode == "scaled_mm":
            raise ConfigError(f"dit_fp8_compute = 'scaled_mm': layer {name}: {problem}; use 'auto' (that layer "
                              f"dequantizes) or 'dequant'")
        plan[name] = "scaled_mm" if use and not problem else "dequant"
    for name, layer in layers:
        layer.fp8_compute = plan[name]
    return fp8_compute_mode(model)


def fp8_compute_mode(model: nn.Module) -> str | None:
    """What the fp8 layers run, for /healthz: "scaled_mm", "dequant", "mixed: N of M fp8 layers on scaled_mm;
    dequantized (...): <their names>" or None when the model has no fp8 layers."""
    layers = _fp8_layers(model)
    if not layers:
        return None
    off = [n for n, m in layers if m.fp8_compute != "scaled_mm"]
    if not off:
        return "scaled_mm"
    if len(off) == len(layers):
        return "dequant"
    shown = ", ".join(off[:3]) + (f" and {len(off) - 3} more" if len(off) > 3 else "")
    return (f"mixed: {len(layers) - len(off)} of {len(layers)} fp8 layers on scaled_mm; dequantized (in/out "
            f"features not multiples of {SCALED_MM_ALIGN}): {shown}")


# --------------------------------------------------------------------------------------------------
# State dicts (the loader's quantization step) and pre-quantized files
# --------------------------------------------------------------------------------------------------
def quantize_state_dict(sd: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """sd with every block linear weight (LightX2V's rule: 2-D `blocks.N.{self_attn,cross_attn,ffn}.X.weight`)
    replaced by its 8-bit codes plus `X.weight_scale`, as quantize_dit does to a module; everything else kept."""
    scheme = normalize_scheme(scheme)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name, _, param = k.rpartition(".")
        if param == "weight" and v.dim() == 2 and is_quantized_name(name):
            if v.dtype not in _FLOATS:
                raise ValueError(f"{k} is already {v.dtype}; cannot quantize it to {scheme}")
            out[k], out[f"{name}.weight_scale"] = quantize_weight(v, scheme)
        else:
            out[k] = v
    return out


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_quantized_dtypes(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], scheme: str,
                           source: str) -> None:
    """A pre-quantized file against the quantized module's state dict `expected`: each quantized layer an
    int8/fp8 weight of the scheme and a finite float scale; every other tensor a float (an 8-bit tensor there
    would be cast to float silently, scale lost). Names the key."""
    want = QDTYPE[scheme]
    for skey in (k for k in expected if k.endswith(".weight_scale")):
        wkey = skey.removesuffix("_scale")
        w, s = sd.get(wkey), sd.get(skey)
        if w is None:
            continue  # reported with the other missing keys
        if w.dtype != want:
            if w.dtype in (torch.float32, torch.float16, torch.bfloat16):
                hint = (f"an unquantized weight{'' if s is not None else ' and no ' + skey}: is this the original "
                        f"checkpoint? Load it with load_dit (dit_original_ckpt) and quantize_dit, or convert it "
                        f"with LightX2V's converter --quantized --linear_type {scheme}")
            else:
                hint = f"quantized with another scheme than dit_quant_scheme={scheme}?"
            raise CheckpointError(f"{source}: {wkey} is {w.dtype}, expected {want} for {scheme} ({hint})")
        if s is None:
            raise CheckpointError(f"{source}: {wkey} is {w.dtype} but its per-channel scale {skey} is missing")
        if s.dtype not in _FLOATS:
            raise CheckpointError(f"{source}: {skey} is {s.dtype}; expected a float scale (fp32)")
        if not bool(torch.isfinite(s.float()).all()):
            raise CheckpointError(f"{source}: {skey} has non-finite values")
    for k, exp in expected.items():
        v = sd.get(k)
        if v is not None and exp.dtype in _FLOATS and v.dtype not in _FLOATS:
            raise CheckpointError(f"{source}: {k} is {v.dtype}, but wanserve keeps it unquantized (LightX2V "
                                  f"quantizes only the blocks' attention and FFN linears); expected a float tensor")
