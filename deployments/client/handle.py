"""The Serve-handle transports, for code inside the Ray cluster (a task, an actor, another deployment): each
call is the router's handle method of the same name, no HTTP; results come back through the object store.
An ApiError raised in the router arrives wrapped (RayTaskError) and is made a WanError again."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .core import AsyncCore, SyncCore, WanError, op_timeout, parse_retry_after


def _as_wan_error(e: BaseException) -> WanError | None:
    """The router's ApiError inside e as a WanError; None when e is not one (it is raised as it is)."""
    cause = getattr(e, "cause", None) or e
    status = getattr(cause, "status", None)
    if not isinstance(status, int):
        return None
    retry = parse_retry_after((getattr(cause, "headers", None) or {}).get("Retry-After"))
    return WanError(status, getattr(cause, "message", str(cause)), getattr(cause, "code", None), retry)


def _reraise(e: BaseException):
    """Raise e again: as a WanError when the router refused the call, else as it is."""
    err = _as_wan_error(e)
    if err is None:
        raise e
    raise err from e


def _arguments(op: str, args: tuple) -> tuple:
    if op == "submit" and isinstance(args[1], Path):  # a str image is the router's: base64 or a rooted path
        return args[0], args[1].read_bytes()
    return args


def _answer(op: str, args: tuple, out: Any) -> Any:
    if op == "block" and out is None:
        raise WanError(404, f"job {args[0]} has no block {args[1]}", "block_not_found")
    return out


class HandleClient(SyncCore):
    """Blocking client over the router's handle: `HandleClient(serve.get_app_handle("wanserve"))`; `timeout`
    seconds per call (session open and whole-session video: at least 600)."""

    def __init__(self, router_handle, timeout: float = 60.0):
        self.handle, self.timeout = router_handle, timeout

    def _op(self, op: str, *args) -> Any:
        try:
            out = getattr(self.handle, op).remote(*_arguments(op, args)).result(timeout_s=op_timeout(op, self.timeout))
        except Exception as e:
            _reraise(e)
        return _answer(op, args, out)


class AsyncHandleClient(AsyncCore):
    """Asyncio client over the router's handle, e.g. inside another deployment. Calls are awaited without a
    time limit of their own (wrap them in asyncio.wait_for for one)."""

    def __init__(self, router_handle):
        self.handle = router_handle

    async def _op(self, op: str, *args) -> Any:
        try:
            out = await getattr(self.handle, op).remote(*_arguments(op, args))
        except Exception as e:
            _reraise(e)
        return _answer(op, args, out)
