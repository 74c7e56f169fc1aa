"""Weight-only int8 / fp8 linears for the DiT, and LightX2V's pre-quantized Wan files.

Why: Wan 14B holds 14e9 weights, 28.6 GB in bf16. Users run it as LightX2V does, with the transformer
blocks' linears stored in 8 bits (`dit_quantized`, `dit_quant_scheme` = "int8-vllm", "fp8-sgl", ...,
`dit_quantized_ckpt`), which halves the DiT (14.5 GB) and lets it fit next to T5, CLIP and the VAE.

The format (LightX2V `tools/convert/converter.py --quantized --linear_type int8|fp8 --model_type wan_dit`,
read back by `lightx2v/common/ops/mm/mm_weight.py`, MMWeightQuantTemplate):

  * official Wan key names. For each quantized linear X:
      X.weight        int8 or float8_e4m3fn, [out, in] (as nn.Linear; LightX2V transposes after loading)
      X.weight_scale  one scale per output channel, [out, 1]; fp32 when the source was fp32 (their converter
                      keeps the source dtype and their loader casts it to fp32, so we accept any float dtype)
      X.bias          float, unquantized
  * symmetric per-output-channel: scale = max(absmax(row), 1e-5) / qmax, with qmax = 127 for int8
    (q = clamp(round(w / scale), -127, 127)) and 448 (the largest float8_e4m3fn) for fp8
    (q = fp8(clamp(w / scale, -448, 448)), round to nearest: they round with qtorch, we with torch's cast).
    The 1e-5 floor is theirs (no 0/0 on zero rows).
  * which linears: every 2-D tensor under `blocks.N.self_attn`, `blocks.N.cross_attn` and `blocks.N.ffn`
    (their converter's `target_keys` for wan_dit), i.e. the attention q/k/v/o of self- and cross-attention,
    the I2V image k_img/v_img, and both FFN linears. Their runtime builds exactly these with the
    `dit_quant_scheme` kernel and everything else with "Default": the patch embedding, the text/time
    embeddings, the time projection, the I2V CLIP projection (img_emb) and the head stay in bf16/fp32.
    Those are under 2% of the 14B weights but sit where errors are not averaged over 40 blocks (the
    modulation of every block comes from time_projection; the head writes the output).
  * everything else (norms, modulation, biases, embeddings) is float: fp32 or bf16 (`--non_linear_dtype`).
    Files come as one .safetensors or as a folder of shards (`diffusion_pytorch_model.safetensors.index.json`
    + `block_N.safetensors` / `*_partN.safetensors`).
  * not supported, refused with the reason: per-tensor (`fp8-pertensor`) and 128x128 block scales
    (`fp8-b128-*`), int4/nvfp4/mx formats, GGUF, ComfyUI's `scale_weight` layout.

Numerics: weight-only. A QuantLinear dequantizes (q * scale) and multiplies in its compute dtype (bf16 on
GPU, fp32 on CPU), so the only error is the weight rounding (int8: at most scale/2 per element; fp8: 3
mantissa bits). LightX2V's kernels also quantize the activations per token (W8A8: cutlass/sgl/q8 kernels);
we do not, which is more accurate than LightX2V at the cost of their int8/fp8 tensor-core GEMM.

On CUDA there is no torch kernel that is both weight-only and faster than cuBLAS on the dequantized weight:
`torch._weight_int8pack_mm` has a CUDA kernel but it is a naive one-thread-per-output loop in fp32 (far
slower than a bf16 GEMM at DiT sizes), and `torch._scaled_mm` needs fp8 activations (W8A8). So CUDA also
dequantizes, in the compute dtype (int8/fp8 -> bf16 is exact, then one multiply by the bf16 scale), which
moves 7 bytes per weight instead of the ~19 of an fp32 dequantization. CPU dequantizes in fp32 and rounds
once: exactly the per-row formula above.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (DIT_PREFIXES, CheckpointError, check_state_dict, is_diffusers_dit, load_state_dict,
                         strip_prefix, to_official_dit)
from .config import QUANT_SCHEMES, DiTArch
from .dit import WanModel

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
    qmax = QMAX[scheme]
    w = w.detach().to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=ABSMAX_FLOOR) / qmax
    scaled = w / scale
    if scheme == "int8":
        q = scaled.round().clamp(-qmax, qmax).to(torch.int8)
    else:  # the fp8 cast rounds to nearest even; clamp first (e4m3fn has no inf: overflow would be NaN)
        q = scaled.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    return q, scale


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Weight-only int8/fp8 linear. State dict: `weight` (int8/fp8 [out, in]), `weight_scale` (fp32 [out, 1]),
    `bias` (compute dtype). Casts its input to the compute dtype, like model.dit.Linear.

    The compute dtype is the bias dtype (model.to(dtype) moves it); `.to(dtype)` / `.half()` never touch the
    8-bit weight or the fp32 scale (see _apply).
    """

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
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "QuantLinear":
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
        if x.is_cuda:  # dequantize in the compute dtype: fewer bytes moved (module docstring)
            w = self.weight.to(dtype) * self.weight_scale.to(dtype)
        else:
            w = self.dequantize(dtype)
        return F.linear(x.to(dtype), w, self.bias)

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


def quantize_dit(model: WanModel, scheme: str) -> WanModel:
    """Replace the blocks' attention and FFN linears by QuantLinear, in place; returns the model."""
    scheme = normalize_scheme(scheme)
    for name in quantized_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, QuantLinear):
            if old.scheme != scheme:
                raise ValueError(f"{name} is already quantized as {old.scheme}; cannot re-quantize to {scheme}")
            continue
        setattr(parent, child, QuantLinear.from_linear(old, scheme))
    return model


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
# Loading pre-quantized files
# --------------------------------------------------------------------------------------------------
def read_quantized_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A file (.safetensors, .index.json, .pt) or a folder: its *.safetensors.index.json, else every *.safetensors."""
    path = Path(path)
    if not path.is_dir():
        return load_state_dict(path)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return load_state_dict(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several safetensors indexes ({[p.name for p in indexes]}); "
                              f"pass the one to load")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no quantized weights in {path}: expected *.safetensors (LightX2V converter output)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_state_dict(f)
        dup = sorted(part.keys() & sd.keys())
        if dup:
            raise CheckpointError(f"{f} repeats keys of another shard in {path}, e.g. {dup[:3]}")
        sd.update(part)
    return sd


def _check_dtypes(model: nn.Module, expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                  scheme: str, source: str) -> None:
    """Each quantized layer: an int8/fp8 weight of the scheme and a finite float scale; every other tensor a
    float (an 8-bit tensor there would be cast to float silently, scale lost). Names the key."""
    want = QDTYPE[scheme]
    for name in quantized_names(model):
        wkey, skey = f"{name}.weight", f"{name}.weight_scale"
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


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_quantized_dit(path: str | Path, arch: DiTArch, scheme: str, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu") -> WanModel:
    """A WanModel whose block linears are QuantLinear, loaded strictly from a pre-quantized file or folder.

    dtype: compute dtype of everything unquantized (default bf16 on GPU, fp32 on CPU); the 8-bit weights keep
    their dtype and the scales become fp32. Raises CheckpointError for a missing, unexpected or misshapen key,
    a quantized layer whose weight is not int8/fp8 of the scheme, or a missing scale.
    """
    from .loader import default_dtype

    scheme = normalize_scheme(scheme)
    dtype = dtype or default_dtype(device)
    source = str(path)
    with torch.device("meta"):
        model = quantize_dit(WanModel(arch).to(dtype), scheme)
    expected = model.state_dict()
    sd = read_quantized_weights(path)
    if any(k.endswith(".scale_weight") for k in sd):
        raise CheckpointError(f"{source} is in ComfyUI's scaled-fp8 layout (X.scale_weight, one scale per tensor); "
                              f"wanserve loads LightX2V's layout (X.weight_scale per output channel)")
    sd = strip_prefix(sd, DIT_PREFIXES)
    if is_diffusers_dit(sd):
        sd = to_official_dit(sd, expected.keys())
    sd = {k: (v.reshape(-1, 1) if k.endswith(".weight_scale") and v.dim() == 1 else v) for k, v in sd.items()}
    _check_dtypes(model, expected, sd, scheme, source)
    check_state_dict(expected, sd, f"{scheme}-quantized {arch.model_type} DiT (dim {arch.dim}, "
                                   f"{arch.num_layers} layers)", source)
    model.load_state_dict({k: v.to(device=device, dtype=expected[k].dtype) for k, v in sd.items()},
                          strict=True, assign=True)
    return model.eval().requires_grad_(False)
