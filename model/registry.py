"""The model classes wanserve runs (LightX2V's `model_cls`): every "which model class is this" decision reads
this table. Adding one (Wan2.2 next) is one entry here plus its pipeline class."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelClass:
    name: str  # the config's model_cls
    pipeline: str  # "module:Class" of its pipeline (a path, not an import: the pipelines read this table)
    student: tuple[str, str] | None  # (folder, file stem) of its own DiT weights under the model folder
    sessions: bool  # generates block by block and keeps CausVid sessions
    cfg: bool  # classifier-free guidance allowed
    tasks: tuple[str, ...]  # t2v / i2v
    sampler: Literal["unipc", "step_distill"]
    default_steps: tuple[int, ...] | None = None  # step_distill: denoising_step_list when the config has none
    renoise: Literal["deterministic", "fresh_noise"] | None = None  # step_distill: default re-noising
    warp: bool = False  # step_distill: default warp_denoising_step

    def pipeline_class(self):
        module, _, cls = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), cls)


BASE = ModelClass("wan2.1", "model.pipeline:WanPipeline", None, sessions=False, cfg=True, tasks=("t2v", "i2v"),
                  sampler="unipc")
DISTILL = ModelClass("wan2.1_distill", "model.pipeline:WanPipeline", ("distill_models", "distill_model"),
                     sessions=False, cfg=False, tasks=("t2v", "i2v"), sampler="step_distill",
                     default_steps=(1000, 750, 500, 250),  # LightX2V / Self-Forcing 4-step list
                     renoise="deterministic", warp=True)
CAUSVID = ModelClass("wan2.1_causvid", "model.causal_pipeline:CausVidPipeline", ("causvid_models", "causal_model"),
                     sessions=True, cfg=False, tasks=("t2v",), sampler="step_distill",
                     default_steps=(999, 934, 862, 756, 603, 410, 250, 140, 74),  # LightX2V configs/causvid/
                     renoise="fresh_noise", warp=False)                            # wan_t2v_causvid.json

MODEL_CLASSES: dict[str, ModelClass] = {m.name: m for m in (BASE, DISTILL, CAUSVID)}
NAMES = tuple(MODEL_CLASSES)
ModelClsName = Literal[NAMES]  # type: ignore[valid-type]  # the config field's allowed values


def model_class(name: str) -> ModelClass:
    try:
        return MODEL_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown model_cls {name!r}: one of {', '.join(NAMES)}") from None
