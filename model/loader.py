"""Build a WanModel from a model folder or weight file: architecture from config.json, weights strict.

The DiT is built on the meta device and the loaded tensors are assigned, so a 14B checkpoint costs its
size in memory once, not twice.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, ModelFolder, check_state_dict, load_state_dict, to_official_dit
from .config import DiTArch
from .dit import WanModel


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 weights on GPU; fp32 compute on CPU (bf16 matmuls there are slow and inexact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_dit_arch(folder: str | Path | ModelFolder) -> DiTArch:
    mf = folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder)
    return DiTArch.from_config_json(mf.dit_config())


def build_dit(arch: DiTArch, sd: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device = "cpu",
              source: str = "") -> WanModel:
    """A WanModel holding exactly the weights of sd (any supported naming), cast to dtype."""
    with torch.device("meta"):
        model = WanModel(arch)
    expected = model.state_dict()
    sd = to_official_dit(sd, expected.keys())
    check_state_dict(expected, sd, f"{arch.model_type} DiT (dim {arch.dim}, {arch.num_layers} layers)", source)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_dit(path: str | Path, arch: DiTArch | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> WanModel:
    """Load the DiT from a model folder (official or diffusers layout) or from a weight file.

    A bare weight file (e.g. distill_models/distill_model.safetensors) needs `arch`.
    """
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
    return build_dit(arch, load_state_dict(weights), dtype, device, source=str(weights))
