"""The HTTP API's request and response bodies (they are also its OpenAPI spec).

Shapes follow OpenAI's Videos API where one exists (`POST /v1/videos` takes JSON or multipart, a job is
an object `video` with status queued | in_progress | completed | failed | cancelled and an integer
progress, `size` is "WIDTHxHEIGHT"), plus what wanserve adds: frames, seed, LoRAs, timings, CausVid
sessions. LightX2V's task API has its own models at the end.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.tiers import Tier

from ..states import JobKind, JobState, SessionStatus

SIZE_PATTERN = r"^\s*[0-9]{1,5}\s*[xX*]\s*[0-9]{1,5}\s*$"
MAX_SEED = 2**63 - 2


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="a name from GET /v1/models (`loras`)")
    strength: float = Field(1.0, ge=-4, le=4)


class PromptSpan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="what the span shows")
    fragments: int = Field(ge=1, description="how many fragments it lasts")


class VideoCreate(BaseModel):
    """POST /v1/videos as JSON. Omitted values are the model's defaults (GET /v1/models)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="what to generate")
    model: str | None = Field(None, description="model id; default: the first model of the task the request implies")
    negative_prompt: str | None = None
    image: str | None = Field(None, description="I2V first frame: base64 (or a data: URL) of a PNG/JPEG/WebP, or "
                                                "a path relative to a configured image root")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT, multiples of 16, e.g. 832x480")
    num_frames: int | None = Field(None, ge=1, description="4n+1 frames, e.g. 81")
    seconds: str | None = Field(None, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3})?$",
                                description="OpenAI-style duration; num_frames wins when both are given")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    loras: list[str | LoraRef] | None = Field(None, description="LoRA names (or {name, strength}) from GET /v1/models")
    num_fragments: int | None = Field(None, ge=1, description="CausVid models: fragments in one call")
    decoder: Literal["full", "tiny"] | None = Field(
        None, description="full: the Wan VAE; tiny: the model's tiny decoder (TAEHV, fast previews; models whose "
                          "config has tae_path). Default: the model's (use_tae: tiny)")
    prompt_schedule: list[PromptSpan] | None = Field(
        None, min_length=1, description="CausVid models: prompts with durations, run in order (the first is `prompt`; "
                                        "num_fragments, if given, their total); the cache is re-cached at each switch")


class VideoCreateForm(BaseModel):
    """POST /v1/videos as multipart/form-data: the JSON fields as form fields, the image as a file."""

    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    input_reference: bytes | None = Field(None, json_schema_extra={"format": "binary"},
                                          description="I2V first frame (file upload); `image` is accepted too")
    size: str | None = Field(None, pattern=SIZE_PATTERN)
    num_frames: int | None = Field(None, ge=1)
    seconds: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    loras: str | None = Field(None, description="comma-separated LoRA names, or a JSON list")
    num_fragments: int | None = Field(None, ge=1)
    decoder: Literal["full", "tiny"] | None = None


class JobError(BaseModel):
    code: str
    message: str


class VideoJob(BaseModel):
    """A job: a video, or one fragment of a CausVid session (`kind`)."""

    id: str
    object: Literal["video"] = "video"
    kind: JobKind = JobKind.video
    model: str
    status: JobState
    progress: int = Field(ge=0, le=100)
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    prompt: str | None = None
    size: str | None = None
    num_frames: int | None = None
    seconds: str | None = None
    seed: int | None = None
    loras: list[LoraRef] = Field(default_factory=list)
    session_id: str | None = None
    fragment: int | None = None
    blocks: int = Field(0, description="CausVid: decoded blocks ready at /v1/videos/{id}/blocks/{i}")
    attempts: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    error: JobError | None = None
    url: str | None = Field(None, description="the mp4, once completed")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: str = Field(description="= error.message (FastAPI / LightX2V clients read `detail`)")


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    model_cls: str
    task: Literal["t2v", "i2v"]
    sessions: bool = Field(description="CausVid: POST /v1/sessions works with this model")
    sp_size: int
    device: str
    default_size: str
    default_num_frames: int
    fps: int
    steps: int
    replicas: int = Field(description="running replicas (as of the router's last poll)")
    queued: int
    attention: dict[str, str] = Field(description="attention kernel per LightX2V key (self_attn_1_type, ...); a "
                                      "replica that cannot run one fails to load instead of falling back")
    runtime: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per running replica: the "
                                               "attention kernels, SP backend, compile and warm-up it runs")
    decoders: list[str] = Field(["full"], description="what `decoder` may ask for: full (the Wan VAE), tiny (TAEHV)")
    decoder: str = Field("full", description="the decoder a request gets by default")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    loras: list[str] = Field(default_factory=list, description="LoRA names requests may use")


class Health(BaseModel):
    """GET /healthz: liveness (always 200 while the router answers) and the state at a glance."""

    status: Literal["ok", "degraded"] = Field(description="degraded: a model has no running replica")
    ready: bool = Field(description="every model has a running replica (GET /readyz answers 200)")
    models: dict[str, int] = Field(description="running replicas per model")
    queued: int
    running: int
    loop_errors: dict[str, int] = Field(default_factory=dict, description="items the router's policy loops failed "
                                        "on since it started, by loop (also wanserve_housekeeping_errors_total)")
    runtime: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="per model, per running replica: the attention kernels "
        "(self_attn_1_type, cross_attn_1_type, cross_attn_2_type), SP backend, compile and warm-up it runs "
        "(also wanserve_attention_kernel)")


class Ready(BaseModel):
    """GET /readyz: 200 when every model has a running replica, else 503 naming the ones without."""

    ready: bool
    waiting_for: list[str] = Field(default_factory=list, description="models without a running replica")


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = Field(None, description="a CausVid model (GET /v1/models: sessions = true)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    size: str | None = Field(None, pattern=SIZE_PATTERN)


class FragmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, description="a new prompt from this fragment on (default: keep the last)")


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    model: str
    status: SessionStatus
    prompt: str
    seed: int
    size: str
    created_at: int
    last_used_at: int
    fragments: int
    frames: int
    latent_frames: int = 0
    cache_bytes: int = 0
    memory_bytes: int = 0
    tier: Tier | None = Field(None, description="where the cache is: active (compute device) or idle (CPU memory); "
                                              "None when no replica holds it (it is rebuilt on its next call)")
    replica: str | None = None
    jobs: list[str] = Field(default_factory=list, description="the session's fragment jobs, oldest first")
    error: str | None = None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool


# ---- LightX2V's task API (lightx2v/server/schema.py) --------------------------------------------------
TASK_STATES = {JobState.queued: "pending", JobState.in_progress: "processing", JobState.completed: "completed",
               JobState.failed: "failed", JobState.cancelled: "cancelled"}  # its names for our job states


class TaskRequest(BaseModel):
    """LightX2V's VideoTaskRequest. `infer_steps`, `save_result_path`, `use_prompt_enhancer`,
    `video_duration` and `task_id` are accepted for compatibility: the model's own step list is used and
    results are always named by task id (a client-chosen path is never written)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    image_path: str = Field("", description="base64 image, or a path relative to a configured image root "
                                            "(URLs are not fetched)")
    num_fragments: int = Field(1, ge=1)
    save_result_path: str = ""
    infer_steps: int | None = None
    target_video_length: int | None = Field(None, ge=1)
    target_height: int | None = Field(None, ge=16)
    target_width: int | None = Field(None, ge=16)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    use_prompt_enhancer: bool = False
    video_duration: int | None = None
    task_id: str | None = None
    model: str | None = Field(None, description="wanserve: model id (default: by task)")


class TaskResponse(BaseModel):
    task_id: str
    task_status: str
    save_result_path: str


class TaskStatus(BaseModel):
    task_id: str
    status: Literal[tuple(TASK_STATES.values())]  # type: ignore[valid-type]
    start_time: str | None = None
    end_time: str | None = None
    error: str | None = None
    save_result_path: str | None = None
    progress: int = 0


class StopTaskResponse(BaseModel):
    stop_status: str
    reason: str


class QueueStatus(BaseModel):
    is_processing: bool
    current_task: str | None
    pending_count: int
    active_count: int
    queue_size: int
    queue_available: int


class ServiceStatus(BaseModel):
    service_status: Literal["busy", "idle"]
    current_task: str | None
    active_tasks: list[str]
    pending_tasks: int
    queue_size: int
    total_tasks: int
    completed_tasks: int
    failed_tasks: int


MP4 = {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}, "description": "mp4 video"}
SSE = {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "server-sent events"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (they all share ErrorResponse)."""
    return {c: {"model": ErrorResponse, "description": ErrorResponse.model_fields["error"].description or "error"}
            for c in codes}


def schema_extra(models: list[type[BaseModel]]) -> dict[str, Any]:
    """JSON schemas of models the routes parse by hand, for the OpenAPI components."""
    out: dict[str, Any] = {}
    for m in models:
        schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[m.__name__] = schema
    return out
