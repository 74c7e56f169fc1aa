"""Shared test utilities: tiny random models and their files in official / diffusers layouts."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.archs import DiTArch
from model.checkpoint import save_sharded, to_diffusers_dit
from model.dit import WanModel


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with n torch intra-op threads (tiny tensors: one thread is fastest and does not fight a loaded
    2-core machine), then restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so no key can be silently ignored by a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(noise + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
    return module


def tiny_dit(arch: DiTArch, seed: int = 0) -> WanModel:
    return randomize(WanModel(arch), seed).eval()


def write_official_dit(folder: Path, model: WanModel, shard_bytes: int | None = None,
                       dtype: torch.dtype = torch.float32) -> Path:
    """config.json + diffusion_pytorch_model.safetensors (or shards + index) with official key names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.arch.to_config_json()))
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if shard_bytes:
        return save_sharded(sd, folder, "diffusion_pytorch_model", shard_bytes)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder / "diffusion_pytorch_model.safetensors"


def write_diffusers_dit(root: Path, model: WanModel) -> Path:
    """model_index.json + transformer/{config.json, diffusion_pytorch_model.safetensors} (diffusers names)."""
    tdir = root / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (tdir / "config.json").write_text(json.dumps(model.arch.to_diffusers_config()))
    save_file(to_diffusers_dit(model.state_dict()), str(tdir / "diffusion_pytorch_model.safetensors"))
    return root


def dit_inputs(arch: DiTArch, batch: int = 2, frames: int = 3, h: int = 8, w: int = 12, text: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(x=torch.randn(batch, arch.out_dim, frames, h, w, generator=g),
              t=torch.tensor([999.0, 437.5, 10.0, 1.0][:batch]),
              context=torch.randn(batch, text, arch.text_dim, generator=g))
    if arch.is_i2v:
        kw["clip_fea"] = torch.randn(batch, 257, arch.img_dim, generator=g)
        kw["y"] = torch.randn(batch, arch.in_dim - arch.out_dim, frames, h, w, generator=g)
    return kw


def reference_attention(q, k, v, key_mask=None):
    """Independent float64 softmax attention -> (out, lse); q [B, Lq, H, D], k/v [B, Lk, H, D], key_mask bool
    [B, Lk] or [Lk] (True = attend)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        m = key_mask.view(-1, 1, 1, key_mask.shape[-1]) if key_mask.dim() == 2 else key_mask.view(1, 1, 1, -1)
        s = s.masked_fill(~m, -math.inf)
    return (torch.softmax(s, -1) @ v).transpose(1, 2), torch.logsumexp(s, -1)
