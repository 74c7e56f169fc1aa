"""Request bodies parsed by hand (POST /v1/videos takes JSON or multipart) and the one submit path shared by
the HTTP routes, the LightX2V routes and the router's handle API."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..router.service import Service
from .errors import ApiError, bad_request
from .schemas import LoraRef, VideoCreate


async def read_capped(request: Request, cap: int) -> bytes:
    """The body, refusing (413) more than cap bytes whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"request body is {declared} bytes; at most {cap} (limits.max_upload_bytes)",
                       "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"request body is larger than the server accepts: at most {cap} bytes "
                                "(limits.max_upload_bytes)", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_video_request(request: Request, cap: int) -> tuple[dict, bytes | str | None]:
    """(VideoCreate fields, image: upload bytes | JSON `image` string | None) of POST /v1/videos."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _parse_form(request, cap)
    if ctype not in ("application/json", ""):
        raise ApiError(415, f"content-type {ctype!r} is not accepted: send application/json or multipart/form-data",
                       "unsupported_media_type")
    raw = await read_capped(request, cap + 65536)
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object with at least a `prompt`", None, "invalid_json")
    try:
        body = VideoCreate.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    return body, body.pop("image", None)


async def _parse_form(request: Request, cap: int) -> tuple[dict, bytes | str | None]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap + 65536:
        raise ApiError(413, f"upload is {declared} bytes; at most {cap} (limits.max_upload_bytes)", "upload_too_large")
    try:
        form = await request.form(max_files=2, max_fields=32, max_part_size=cap)
    except Exception as e:  # starlette's multipart errors have no common type: each means "malformed"
        raise bad_request(f"malformed form data: {e}", None, "invalid_form") from None
    fields: dict[str, Any] = {}
    image: bytes | str | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("input_reference", "image"):
                raise bad_request(f"unexpected file field {key!r}: upload the image as `input_reference`", key)
            data = await value.read(cap + 1)
            if len(data) > cap:
                raise ApiError(413, f"{key} is larger than the server accepts: at most {cap} bytes "
                                    "(limits.max_upload_bytes); send a smaller image", "upload_too_large", key)
            image = data
        elif key == "image" and value:
            image = value
        elif key == "loras":
            fields[key] = _form_loras(value)
        elif value != "":
            fields[key] = value
    try:
        body = VideoCreate.model_validate(fields).model_dump(exclude_none=True)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    return body, image


def _form_loras(value: str) -> list:
    value = value.strip()
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"loras: not a JSON list ({e}); or send comma-separated names", "loras") from None
    return [x.strip() for x in value.split(",") if x.strip()]


async def submit_video(svc: Service, body: dict, image: bytes | str | None) -> dict:
    """Validate, store the image, queue: the job as the API shows it."""
    path = None
    if isinstance(image, bytes):
        path = await asyncio.to_thread(svc.catalog.store_image, image, "input_reference")
    elif isinstance(image, str) and image:
        path = await asyncio.to_thread(svc.catalog.image_field, image)
    if body.get("loras"):
        body["loras"] = [x if isinstance(x, str) else (x.model_dump() if isinstance(x, LoraRef) else x)
                         for x in body["loras"]]
    view, req = await asyncio.to_thread(svc.catalog.video_request, body, path)
    return svc.jobs.view(await svc.jobs.submit(view.name, req))
