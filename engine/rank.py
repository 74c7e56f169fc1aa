"""One rank's share of a model, whatever its class: the pipeline and the runner come from the registry, so
the Ray worker and the torchrun CLI never ask which model class they run."""
from __future__ import annotations

from pathlib import Path

import torch

from model.config import RunConfig
from model.pipeline import load_vae
from model.quant import fp8_compute_mode
from model.registry import MODEL_CLASSES, model_class
from parallel.group import Group

from .causal_runner import CausalRunner
from .runner import ParallelRunner, split_vae


def has_sessions(cfg: RunConfig) -> bool:
    """Does this config's model class keep sessions (block-by-block generation, CausalRunner)?"""
    return model_class(cfg.model_cls).sessions


def session_model_classes() -> str:
    """The model classes that keep sessions, for error messages ("a", "b")."""
    return ", ".join(repr(m.name) for m in MODEL_CLASSES.values() if m.sessions)


def load_rank_pipeline(model_path: str | Path, cfg: RunConfig, rank: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None, lora_roots=None):
    """Rank 0: the whole pipeline of `cfg.model_cls`; other ranks: its DiT, and its VAE where the group splits the
    VAE (`split_vae`; they never encode text or images)."""
    pipeline = model_class(cfg.model_cls).pipeline_class()
    pipe = pipeline.from_pretrained(model_path, cfg, device=device, dtype=dtype, lora_roots=lora_roots,
                                    denoise_only=rank != 0)
    if rank != 0 and split_vae(cfg):
        pipe.vae = load_vae(model_path, device)
    return pipe


def runtime_info(runner: CausalRunner | ParallelRunner) -> dict:
    """What this rank runs, as /healthz and /v1/models report it: attention kernels by config key, the
    sequence-parallel backend, compile and warm-up, how fp8 weights multiply."""
    dit = runner.pipe.dit
    layout = dit.layout
    return {"attention": dit.kernels.names(), "sp_backend": layout.attn.backend if layout.sharded else None,
            "compile": runner.warmup,
            "fp8_compute": fp8_compute_mode(dit)}


def rank_runner(pipe, group: Group) -> CausalRunner | ParallelRunner:
    """The runner of this pipeline's model class on this rank: CausalRunner for a class with sessions."""
    return (CausalRunner if has_sessions(pipe.cfg) else ParallelRunner)(pipe, group)
