"""The arguments of the Serve application (`args:` of configs/serve/*.yaml), validated up front.

Why a model of its own: `serve run` / `serve deploy` hand `build_app` a plain dict, and a typo there
would otherwise surface minutes later as a replica that cannot start. Every key is checked here, with
the key, the value and the rule in the message. The same models give the router and the generator
replicas their settings, so both sides read one definition.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.registry import ModelClsName, model_class
from model.validation import format_validation_error

MODEL_NAME_RE = r"^[a-z0-9][a-z0-9.-]*$"


class ArgsError(ValueError):
    """The application's args are invalid; the message lists every bad key."""


class Autoscaling(BaseModel):
    """Replica bounds of one model. The router keeps the queue, so Serve cannot see it: the replicas
    report the router's backlog and `deployments.policy:backlog_policy` scales on it (see there)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(1.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas = {self.max_replicas}: must be >= min_replicas = {self.min_replicas}")
        return self


class SessionSettings(BaseModel):
    """CausVid sessions: how long and how much a generator replica keeps (deployments/sessions.py)."""

    model_config = ConfigDict(extra="forbid")
    ttl_s: float = Field(1800.0, gt=0, description="a session idle this long is closed in the replica "
                                                   "(its state stays with the router: it can be rebuilt)")
    idle_after_s: float = Field(60.0, ge=0, description="a session idle this long moves to the CPU tier")
    max_device_bytes: int = Field(8 << 30, gt=0, description="cache bytes per replica on the device; "
                                                            "beyond it the least recently used go to CPU")
    max_idle_bytes: int = Field(32 << 30, gt=0, description="cache bytes per replica in the CPU tier; "
                                                           "beyond it the least recently used are closed")
    max_sessions: int = Field(64, ge=1, description="open sessions per replica")
    retention_s: float = Field(24 * 3600.0, gt=0, description="the router forgets a session idle this long")
    max_fragments: int | None = Field(None, ge=1, description="fragments per session: an operator's cap (unset: "
                                                              "none; a windowed CausVid session has no end)")


class Limits(BaseModel):
    """What one request may ask for; beyond these the router answers 4xx saying which limit."""

    model_config = ConfigDict(extra="forbid")
    max_prompt_chars: int | None = Field(None, ge=1, description="prompt length; default: each model's own "
                                         "(its config's max_prompt_chars), which this sets for every model")
    max_frames: int = Field(161, ge=1)
    max_pixels: int = Field(1280 * 720, ge=256, description="height * width")
    max_upload_bytes: int = Field(10 << 20, ge=1024)
    max_loras: int = Field(4, ge=0)
    max_fragments_per_job: int = Field(8, ge=1, description="num_fragments of a one-call CausVid job")


class ModelSpec(BaseModel):
    """One model = one generator deployment; each replica is one SP group of `sp_size` ranks."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=MODEL_NAME_RE)
    model_path: str
    model_cls: ModelClsName
    task: Literal["t2v", "i2v"]
    config_json: str
    device: Literal["cpu", "cuda"] = "cpu"
    sp_size: int = Field(1, ge=1)
    num_replicas: int | None = Field(None, ge=1)
    autoscaling: Autoscaling | None = None
    # Optional tuning (tests, small machines); the defaults are what a GPU node wants.
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of config_json keys")
    num_threads: int | None = Field(None, ge=1, description="torch threads per rank (CPU)")
    replica_cpus: float = Field(1.0, gt=0, description="CPU of bundle 0 (the replica actor)")
    rank_cpus: float = Field(1.0, gt=0, description="CPU of each rank's bundle")
    max_ongoing_requests: int = Field(8, ge=2, description="jobs run one at a time; the rest are control calls")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    start_timeout_s: float = Field(600.0, gt=0, description="loading the model and joining the group")
    job_timeout_s: float | None = Field(None, gt=0, description="a job running longer fails (ranks hung)")

    @model_validator(mode="after")
    def _check(self):
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError(f"model {self.name!r}: give num_replicas or autoscaling, not both")
        if self.num_replicas is None and self.autoscaling is None:
            self.num_replicas = 1
        kind = model_class(self.model_cls)
        if self.task not in kind.tasks:
            words = " and ".join({"t2v": "text-to-video", "i2v": "image-to-video"}[t] for t in kind.tasks)
            raise ValueError(f"model {self.name!r}: {kind.name} is {words} only (task: {self.task})")
        return self

    @property
    def causvid(self) -> bool:
        """Block-by-block generation with sessions (the registry's `sessions`)."""
        return model_class(self.model_cls).sessions

    @property
    def deployment_name(self) -> str:
        return "Generator-" + self.name

    def run_config(self, base_dir: str | Path | None = None):
        """The model.config.RunConfig the replicas run (config_json + overrides + model_cls/task/parallel)."""
        from model.config import load_run_config

        path = Path(self.config_json)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        overrides: dict[str, Any] = {**self.config, "model_cls": self.model_cls, "task": self.task}
        if self.sp_size > 1 and "parallel" not in self.config:
            overrides["parallel"] = {"seq_p_size": self.sp_size}
        cfg = load_run_config(path, **overrides)
        world = cfg.parallel.world_size if cfg.parallel is not None else 1
        if world != self.sp_size:
            raise ArgsError(f"model {self.name!r}: sp_size = {self.sp_size} but its config's parallel block makes "
                            f"{world} ranks (seq_p_size x cfg_p_size); make them equal")
        return cfg

    def bundles(self) -> list[dict[str, float]]:
        """Bundle 0 holds the replica actor; bundle 1 + r holds rank r (one GPU each on CUDA)."""
        rank = {"CPU": self.rank_cpus, **({"GPU": 1} if self.device == "cuda" else {})}
        return [{"CPU": self.replica_cpus}] + [dict(rank) for _ in range(self.sp_size)]


class AppArgs(BaseModel):
    """`args:` of the Serve application (documented in configs/serve/demo.yaml)."""

    model_config = ConfigDict(extra="forbid")
    state_dir: str
    models: list[ModelSpec] = Field(min_length=1)
    image_roots: list[str] = Field(default_factory=list)
    lora_roots: list[str] = Field(default_factory=list)
    max_queued_jobs: int = Field(64, ge=1)
    auth_token_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="finished jobs and their videos are kept this long")
    max_attempts: int = Field(2, ge=1, description="a job whose replica died is run at most this many times")
    router_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources the router "
                                               "asks for: pins it to the node that holds state_dir")
    limits: Limits = Field(default_factory=Limits)
    sessions: SessionSettings = Field(default_factory=SessionSettings)

    @field_validator("models")
    @classmethod
    def _unique(cls, models):
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        return models

    @model_validator(mode="after")
    def _one_prompt_limit(self):
        """limits.max_prompt_chars travels to every model as its config key, so the router's check and the
        replicas' check are one check with one limit (a model's own `config` override wins)."""
        if self.limits.max_prompt_chars is not None:
            for m in self.models:
                m.config.setdefault("max_prompt_chars", self.limits.max_prompt_chars)
        return self

    @property
    def uploads_dir(self) -> Path:
        return Path(self.state_dir) / "uploads"

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def parse_args(args: dict[str, Any] | AppArgs) -> AppArgs:
    """Validate build_app's args; ArgsError lists every problem as `key.path = value: rule`."""
    if isinstance(args, AppArgs):
        return args
    if not isinstance(args, dict):
        raise ArgsError(f"the application args must be a mapping, got {type(args).__name__}")
    try:
        return AppArgs.model_validate(args)
    except ValidationError as err:
        raise ArgsError(format_validation_error(
            err, "invalid wanserve application args", root="<args>", hide_input=("missing", "extra_forbidden"),
            messages={"extra_forbidden": "unknown key (see configs/serve/demo.yaml for the keys)"})) from None


def retry_after_s(queued: int, replicas: int, mean_job_s: float | None) -> int:
    """Seconds a client should wait before retrying a full queue: one job's worth of the backlog."""
    per_job = mean_job_s if mean_job_s and mean_job_s > 0 else 10.0
    return max(1, min(3600, math.ceil(per_job * max(1, queued) / max(1, replicas) / 4)))
