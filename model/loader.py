"""The one DiT loader. Its steps, in the order they run (`load_pipeline_dit`):

  files -> state dict -> key conversion (and the cast to the module's dtypes) -> LoRA merge -> quantization
  -> module -> which GEMM fp8 layers run (`dit_fp8_compute`, on the device the module was loaded to)

Every pipeline and runner loads its DiT here; the other helpers (`load_dit`, `build_dit`,
`load_quantized_dit`) are the same steps with fewer of them. The module is built on the meta device and
the tensors are assigned, so a 14B checkpoint costs its size in memory once, not twice.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .archs import DiTArch
from .checkpoint import (
    CheckpointError,
    ModelFolder,
    StateDict,
    check_state_dict,
    find_weights,
    read_weights,
    to_official_dit,
)
from .config import RunConfig
from .dit import WanModel
from .lora import merge_lora_weights
from .quant import (
    check_fp8_compute,
    check_quantized_dtypes,
    normalize_scheme,
    quantize_dit,
    quantize_state_dict,
    set_fp8_compute,
)

log = logging.getLogger(__name__)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 weights on GPU; fp32 compute on CPU (bf16 matmuls there are slow and inexact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_dit_arch(folder: str | Path | ModelFolder) -> DiTArch:
    mf = folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder)
    return DiTArch.from_config_json(mf.dit_config())


# --------------------------------------------------------------------------------------------------
# 1. Files
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTFiles:
    path: Path  # a weight file (or, pre-quantized, a folder of shards)
    scheme: str | None  # int8 / fp8: a pre-quantized LightX2V file in that scheme; None: float weights


def _resolve_file(value: str, folder: ModelFolder) -> Path:
    p = Path(value)
    for cand in (p, folder.root / p):
        if cand.is_file():
            return cand
    raise CheckpointError(f"weight file not found: looked for {p} and {folder.root / p}")


def dit_files(folder: ModelFolder, cfg: RunConfig) -> DiTFiles:
    """Which weights the config asks for, as LightX2V resolves them:

    - pre-quantized (`dit_quantized_ckpt`): that file, int8/fp8 (RunConfig refuses it with lora_configs);
    - a model class with its own student DiT (model/registry.py `student`) and no LoRAs: `dit_original_ckpt`,
      else `<model>/<student folder>/<stem>.*` (distill_models/distill_model, causvid_models/causal_model);
    - otherwise (the base class, or any non-empty lora_configs): the base Wan2.1 DiT of the folder.
    """
    if cfg.dit_quantized and cfg.dit_quantized_ckpt:
        return DiTFiles(_resolve_file(cfg.dit_quantized_ckpt, folder), normalize_scheme(cfg.dit_quant_scheme))
    student = cfg.model_class.student
    if student is not None and not cfg.lora_configs:
        sub, stem = student
        path = (_resolve_file(cfg.dit_original_ckpt, folder) if cfg.dit_original_ckpt
                else find_weights(folder.root / sub, [stem]))
    else:
        path = folder.dit_weights()
    return DiTFiles(path, None)


# --------------------------------------------------------------------------------------------------
# 2.-3. State dict, key conversion, dtypes
# --------------------------------------------------------------------------------------------------
def dit_skeleton(arch: DiTArch, dtype: torch.dtype, scheme: str | None = None) -> WanModel:
    """The DiT on the meta device in dtype; its block linears QuantLinear of `scheme` when given."""
    with torch.device("meta"):
        model = WanModel(arch).to(dtype)
        return quantize_dit(model, scheme) if scheme else model


def _what(arch: DiTArch, scheme: str | None) -> str:
    q = f"{scheme}-quantized " if scheme else ""
    return f"{q}{arch.model_type} DiT (dim {arch.dim}, {arch.num_layers} layers)"


def convert_dit_weights(sd: StateDict, arch: DiTArch, dtype: torch.dtype, device: str | torch.device,
                        scheme: str | None = None, source: str = "") -> StateDict:
    """Official names (from diffusers or prefixed ones), checked strictly against the DiT, each tensor cast to
    the dtype its module holds it in: compute dtype; pre-quantized (`scheme`): 8-bit weights as they are,
    fp32 scales. A pre-quantized file's layer dtypes are checked before any cast could hide a wrong one."""
    expected = dit_skeleton(arch, dtype, scheme).state_dict()
    if scheme and any(k.endswith(".scale_weight") for k in sd):
        raise CheckpointError(f"{source} is in ComfyUI's scaled-fp8 layout (X.scale_weight, one scale per tensor); "
                              f"wanserve loads LightX2V's layout (X.weight_scale per output channel)")
    sd = to_official_dit(sd, expected.keys())
    if scheme:
        sd = {k: (v.reshape(-1, 1) if k.endswith(".weight_scale") and v.dim() == 1 else v) for k, v in sd.items()}
        check_quantized_dtypes(expected, sd, scheme, source)
    check_state_dict(expected, sd, _what(arch, scheme), source)
    return {k: v.to(device=device, dtype=expected[k].dtype) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# 6. Module
# --------------------------------------------------------------------------------------------------
def dit_module(arch: DiTArch, sd: StateDict, dtype: torch.dtype, scheme: str | None = None,
               source: str = "") -> WanModel:
    """A WanModel holding exactly sd's tensors (no copy): QuantLinear where `scheme` quantized them."""
    model = dit_skeleton(arch, dtype, scheme)
    check_state_dict(model.state_dict(), sd, _what(arch, scheme), source)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The loader, and the same steps for one file
# --------------------------------------------------------------------------------------------------
def load_pipeline_dit(folder: ModelFolder, cfg: RunConfig, dtype: torch.dtype, device: str | torch.device,
                      lora_roots: Sequence[str | Path] | None = None, arch: DiTArch | None = None) -> WanModel:
    """The DiT cfg asks for: its files, every LoRA merged in order, quantized on load when `dit_quantized`
    has no pre-quantized file (after the merge), fp8 layers set to `dit_fp8_compute` on device (a ConfigError
    where "scaled_mm" cannot run). arch: the folder's, when the caller has read it already."""
    check_fp8_compute(cfg.dit_fp8_compute, device)  # before any weight is read: fail fast
    arch = arch or read_dit_arch(folder)
    files = dit_files(folder, cfg)  # 1
    log.info("loading DiT weights from %s", files.path)
    source = str(files.path)
    sd = read_weights(files.path)  # 2
    sd = convert_dit_weights(sd, arch, dtype, device, files.scheme, source)  # 3
    if cfg.lora_configs:  # 4
        roots = lora_roots if lora_roots is not None else [folder.root]
        log.info("%s", merge_lora_weights(sd, cfg.lora_configs, roots=roots))
    scheme = files.scheme
    if cfg.dit_quantized and scheme is None:  # 5
        scheme = normalize_scheme(cfg.dit_quant_scheme)
        sd = quantize_state_dict(sd, scheme)
    model = dit_module(arch, sd, dtype, scheme, source)  # 6
    _fp8_compute(model, cfg.dit_fp8_compute, device)  # 7
    return model


def _fp8_compute(model: WanModel, mode: str, device: str | torch.device) -> None:
    in_force = set_fp8_compute(model, mode, device)
    if in_force is not None:
        log.info("fp8 DiT layers: %s (dit_fp8_compute = %s, device %s)", in_force, mode, device)


def build_dit(arch: DiTArch, sd: StateDict, dtype: torch.dtype, device: str | torch.device = "cpu",
              source: str = "") -> WanModel:
    """A WanModel holding exactly the weights of sd (any supported naming), cast to dtype."""
    return dit_module(arch, convert_dit_weights(sd, arch, dtype, device, None, source), dtype, None, source)


def load_dit(path: str | Path, arch: DiTArch | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> WanModel:
    """The DiT of a model folder (official or diffusers layout) or of a weight file (which needs `arch`)."""
    path = Path(path)
    dtype = dtype or default_dtype(device)
    if path.is_dir():
        mf = ModelFolder.open(path)
        arch = arch or read_dit_arch(mf)
        weights = mf.dit_weights()
    else:
        if arch is None:
            raise CheckpointError(f"{path} is a bare weight file: pass the architecture (read_dit_arch of its folder)")
        weights = path
    return build_dit(arch, read_weights(weights), dtype, device, source=str(weights))


def load_quantized_dit(path: str | Path, arch: DiTArch, scheme: str, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", fp8_compute: str = "auto") -> WanModel:
    """A WanModel whose block linears are QuantLinear, loaded strictly from a pre-quantized file or folder.

    dtype: compute dtype of everything unquantized (default bf16 on GPU, fp32 on CPU); the 8-bit weights keep
    their dtype and the scales become fp32. Raises CheckpointError for a missing, unexpected or misshapen key,
    a quantized layer whose weight is not int8/fp8 of the scheme, or a missing scale. fp8_compute: as
    `dit_fp8_compute` (model/quant.py set_fp8_compute).
    """
    scheme = normalize_scheme(scheme)
    check_fp8_compute(fp8_compute, device)
    dtype = dtype or default_dtype(device)
    sd = convert_dit_weights(read_weights(path), arch, dtype, device, scheme, str(path))
    model = dit_module(arch, sd, dtype, scheme, str(path))
    _fp8_compute(model, fp8_compute, device)
    return model
