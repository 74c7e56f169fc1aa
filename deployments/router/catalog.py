"""Turn an API request into a job request the generators can run, or refuse it with what to fix.

In the router, so a request that cannot be generated is refused before it takes a queue slot, with a 4xx
naming the field, the value and the rule: the model's own rules (model.config validates size and frames
against the LightX2V config and the DiT), the model's prompt check, and the service's limits. Images and
LoRA files are only opened under the configured roots (model.paths.resolve_under); URLs are not fetched.
Uploaded images are checked, then kept under `<state_dir>/uploads` so a queued job survives a restart.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.config import format_size, parse_size
from model.files import write_atomic

from ..api.errors import ApiError, bad_request
from ..config import AppArgs, ModelSpec

log = logging.getLogger("ray.serve")

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
MAX_IMAGE_SIDE = 8192
_API_NAMES = (("target_video_length", "num_frames"), ("target_height", "size (height)"),
              ("target_width", "size (width)"), ("invalid request:\n  ", ""),
              ("invalid config for this model:\n  ", ""))


@dataclass
class ModelView:
    """What the router knows of one model: its spec, run config and (when readable) DiT architecture."""

    spec: ModelSpec
    cfg: Any  # model.config.RunConfig
    arch: Any | None  # model.config.DiTArch, None if the router cannot read the model folder

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def frames_per_fragment(self) -> int:
        return self.cfg.target_video_length

    def check_shape(self, height: int, width: int, frames: int) -> None:
        """The model's own rules (multiples of 16, 4n+1 frames, CausVid tokens per frame)."""
        from model.config import ConfigError, RunConfig
        from model.validation import validated

        try:
            merged = validated(RunConfig, {**self.cfg.model_dump(), "target_height": height, "target_width": width,
                                           "target_video_length": frames}, "request")
            if self.arch is not None:
                merged.check_arch(self.arch)
        except ConfigError as e:
            msg = str(e)
            for ours, api in _API_NAMES:
                msg = msg.replace(ours, api)
            raise bad_request(f"{self.name}: {msg}", "size") from None


class Catalog:
    """Models, LoRA names and image roots of the service."""

    def __init__(self, args: AppArgs):
        from model.loader import read_dit_arch

        self.args, self.limits = args, args.limits
        self.views: dict[str, ModelView] = {}
        for spec in args.models:
            cfg = spec.run_config()
            try:
                arch = read_dit_arch(spec.model_path)
            except Exception as e:  # e.g. the router's pod has no model volume: the generator checks
                log.info("router: cannot read %s's DiT config (%s); its size checks run on the generator",
                         spec.name, e)
                arch = None
            self.views[spec.name] = ModelView(spec, cfg, arch)
        self.image_roots = [Path(r) for r in args.image_roots] + [args.uploads_dir]
        args.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._loras: dict[str, Path] = {}
        self._loras_at = 0.0

    # ---- models -----------------------------------------------------------------------------------
    def model(self, name: str | None, *, image: bool = False, session: bool = False) -> ModelView:
        if name is not None:
            view = self.views.get(name)
            if view is None:
                raise ApiError(400, f"unknown model {name!r}; available: {sorted(self.views)}", "model_not_found",
                               "model")
        else:
            task = "i2v" if image else "t2v"
            pick = [v for v in self.views.values() if v.spec.task == task and v.spec.causvid == session]
            pick = pick or [v for v in self.views.values() if v.spec.task == task]
            if not pick:
                raise bad_request(f"no {task} model is served; available: {sorted(self.views)}", "model")
            view = pick[0]
        spec = view.spec
        if session and not spec.causvid:
            causvid = [n for n, v in self.views.items() if v.spec.causvid]
            raise bad_request(f"model {spec.name} ({spec.model_cls}) has no sessions: sessions need a CausVid model "
                              f"(GET /v1/models: sessions = true); available: {causvid}", "model", "unsupported")
        if spec.task == "i2v" and not image:
            raise bad_request(f"model {spec.name} is image-to-video: give an image (the first frame) as `image` "
                              "(base64 or a path under an image root) or a multipart upload `input_reference`",
                              "image", "missing_image")
        if spec.task == "t2v" and image:
            i2v = [n for n, v in self.views.items() if v.spec.task == "i2v"]
            raise bad_request(f"model {spec.name} is text-to-video and takes no image; image-to-video models: {i2v}"
                              + (" (CausVid is text-to-video only)" if spec.causvid else ""), "image", "unsupported")
        return view

    # ---- LoRAs --------------------------------------------------------------------------------------
    def loras(self) -> dict[str, Path]:
        """name -> file, for every LoRA file under lora_roots (re-scanned every 10 s)."""
        if time.monotonic() - self._loras_at > 10:
            found: dict[str, Path] = {}
            for root in map(Path, self.args.lora_roots):
                if not root.is_dir():
                    continue
                for p in sorted(root.rglob("*"))[:5000]:
                    if p.suffix in LORA_SUFFIXES and p.is_file():
                        found.setdefault(p.relative_to(root).with_suffix("").as_posix(), p.resolve())
            self._loras, self._loras_at = found, time.monotonic()
        return self._loras

    def resolve_loras(self, items: list | None) -> list[dict]:
        if not items:
            return []
        if len(items) > self.limits.max_loras:
            raise bad_request(f"{len(items)} LoRAs given; at most {self.limits.max_loras}", "loras", "too_many")
        known = self.loras()
        out = []
        for item in items:
            name, strength = (item, 1.0) if isinstance(item, str) else (item["name"], float(item.get("strength", 1.0)))
            if name not in known:
                hint = f"available: {sorted(known)}" if known else "this server has no LoRAs (lora_roots is empty)"
                raise bad_request(f"unknown LoRA {name!r}; {hint}", "loras", "lora_not_found")
            out.append({"name": name, "path": str(known[name]), "strength": strength})
        return out

    # ---- images ----------------------------------------------------------------------------------------
    def store_image(self, data: bytes, param: str = "image") -> Path:
        """Check an uploaded image and keep it under <state_dir>/uploads; returns its path."""
        if len(data) > self.limits.max_upload_bytes:
            raise ApiError(413, f"{param} is {len(data)} bytes; at most {self.limits.max_upload_bytes}",
                           "upload_too_large", param)
        fmt = check_image(data, param)
        path = self.args.uploads_dir / (hashlib.sha256(data).hexdigest()[:32] + IMAGE_FORMATS[fmt])
        if path.exists():
            path.touch()  # in use again: retention counts from now
        else:
            write_atomic(path, data)
        return path

    def image_field(self, value: str) -> Path:
        """`image` of a JSON request: a data: URL or base64, or a path under an image root."""
        from model.paths import PathNotAllowed, resolve_under

        value = value.strip()
        if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.I):
            raise bad_request("image URLs are not fetched: send the image itself (base64 or a multipart upload)",
                              "image", "url_not_supported")
        if value.startswith("data:"):
            _, _, value = value.partition(",")
            return self.store_image(_b64(value), "image")
        if len(value) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s_-]+", value):
            return self.store_image(_b64(value), "image")
        try:
            path = resolve_under(value, self.image_roots, "image")
        except PathNotAllowed as e:
            raise ApiError(403, f"{e}; upload the image instead", "path_not_allowed", "image") from None
        except (FileNotFoundError, OSError) as e:
            raise bad_request(f"{e}; give a path relative to an image root, or upload the image", "image",
                              "image_not_found") from None
        if not path.is_file():
            raise bad_request(f"image {value!r} is not a file", "image", "image_not_found")
        check_image(path.read_bytes(), "image")
        return path

    # ---- a whole request -----------------------------------------------------------------------------
    def video_request(self, body: dict[str, Any], image_path: Path | None) -> tuple[ModelView, dict]:
        """Validated job request (JSON-serialisable; stored with the job) for POST /v1/videos."""
        lim = self.limits
        view = self.model(body.get("model"), image=image_path is not None)
        spec, cfg = view.spec, view.cfg
        req: dict[str, Any] = {"prompt": self.prompt(body.get("prompt"), view)}
        neg = body.get("negative_prompt")
        if neg is not None:
            req["negative_prompt"] = self.prompt(neg, view, "negative_prompt", allow_empty=True)
        height, width = self.size(body.get("size"), cfg)
        frames = body.get("num_frames")
        if frames is None and body.get("seconds") is not None:
            frames = 4 * round(float(body["seconds"]) * cfg.fps / 4) + 1
        fragments, schedule = body.get("num_fragments"), body.get("prompt_schedule")
        if schedule is not None and not spec.causvid:
            raise bad_request("prompt_schedule: only CausVid models switch prompts between fragments",
                              "prompt_schedule", "unsupported")
        if schedule is not None:
            from model.causal_pipeline import fragment_prompts
            from model.pipeline import RequestError

            try:
                prompts = fragment_prompts(req["prompt"], [dict(s) for s in schedule], fragments)
            except RequestError as e:
                raise bad_request(str(e), "prompt_schedule") from None
            req["prompts"] = [self.prompt(p, view, "prompt_schedule") for p in prompts]
            fragments = len(prompts)
        if spec.causvid:
            if frames is not None and frames != view.frames_per_fragment:
                raise bad_request(f"model {spec.name} is CausVid: it makes fragments of {view.frames_per_fragment} "
                                  "frames; ask for more with num_fragments instead of num_frames", "num_frames")
            frames = view.frames_per_fragment
            fragments = fragments or 1
            if fragments > lim.max_fragments_per_job:
                raise bad_request(f"num_fragments = {fragments}: at most {lim.max_fragments_per_job} in one job; "
                                  "for longer videos open a session (POST /v1/sessions)", "num_fragments")
            req["num_fragments"] = fragments
        elif fragments not in (None, 1):
            raise bad_request(f"num_fragments = {fragments}: only CausVid models make fragments", "num_fragments",
                              "unsupported")
        frames = cfg.target_video_length if frames is None else int(frames)
        if frames > lim.max_frames:
            raise bad_request(f"num_frames = {frames}: at most {lim.max_frames}", "num_frames", "too_many_frames")
        view.check_shape(height, width, frames)
        req.update(height=height, width=width, num_frames=frames, seed=self.seed(body.get("seed")))
        loras = self.resolve_loras(body.get("loras"))
        if loras and spec.causvid:
            raise bad_request("LoRAs are not supported with CausVid models", "loras", "unsupported")
        req["loras"] = loras
        decoder = body.get("decoder")
        if decoder is not None:
            if spec.causvid:
                raise bad_request("decoder: CausVid models decode with their config's decoder (use_tae)", "decoder",
                                  "unsupported")
            if decoder == "tiny" and cfg.tae_path is None:
                raise bad_request(f"decoder = 'tiny': model {spec.name} has no tiny decoder (its config sets no "
                                  "tae_path)", "decoder", "unsupported")
            req["decoder"] = decoder
        if image_path is not None:
            req["image"] = str(image_path)
        return view, req

    def session_request(self, body: dict[str, Any]) -> tuple[ModelView, dict]:
        view = self.model(body.get("model"), session=True)
        height, width = self.size(body.get("size"), view.cfg)
        view.check_shape(height, width, view.frames_per_fragment)
        return view, {"prompt": self.prompt(body.get("prompt"), view), "seed": self.seed(body.get("seed")),
                      "height": height, "width": width}

    @staticmethod
    def prompt(prompt: Any, view: ModelView, param: str = "prompt", allow_empty: bool = False) -> str:
        """The model's own prompt check (model.pipeline.check_prompt, its config's max_prompt_chars), as a 400."""
        from model.pipeline import RequestError, check_prompt

        if allow_empty and prompt == "":
            return prompt
        try:
            return check_prompt(prompt, view.cfg.max_prompt_chars, param)
        except RequestError as e:
            code = "empty_prompt" if isinstance(prompt, str) and not prompt.strip() else "prompt_too_long"
            raise bad_request(f"{e}" + (": describe the video to generate" if code == "empty_prompt" else ""),
                              param, code) from None

    def size(self, size: str | None, cfg) -> tuple[int, int]:
        if size is None:
            height, width = cfg.target_height, cfg.target_width
        else:
            try:
                height, width = parse_size(size)
            except ValueError as e:
                raise bad_request(str(e), "size") from None
        if height < 16 or width < 16:
            raise bad_request(f"size {format_size(height, width)}: at least 16x16", "size")
        if height * width > self.limits.max_pixels:
            raise bad_request(f"size {format_size(height, width)} is {height * width} pixels; at most "
                              f"{self.limits.max_pixels}", "size", "too_large")
        return height, width

    @staticmethod
    def seed(seed: Any) -> int:
        if seed is None:
            import secrets

            return secrets.randbelow(2**32)  # chosen here, so a retry or a restart renders the same video
        return int(seed)


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()).replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"image is not valid base64 ({e}); send base64 of a PNG/JPEG/WebP file, or a path",
                          "image", "invalid_image") from None


def check_image(data: bytes, param: str = "image") -> str:
    """The image's format if it is a readable PNG/JPEG/WebP/BMP of sane size; 400 otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
            if fmt not in IMAGE_FORMATS:
                raise bad_request(f"{param}: {fmt} images are not accepted; use PNG, JPEG or WebP", param,
                                  "invalid_image")
            if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w < 1 or h < 1:
                raise bad_request(f"{param} is {w}x{h}; at most {MAX_IMAGE_SIDE} pixels a side", param, "invalid_image")
            img.verify()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{param} is not a readable image ({e}); use PNG, JPEG or WebP", param,
                          "invalid_image") from None
    return fmt


def load_image(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] of a stored image (the generators take arrays: their pods have no state volume)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
