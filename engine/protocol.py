"""Rank 0's side of every collective call a job makes: one home for the three things both runners need.

Rank 0 alone validates, encodes, reads the cancel flag and reports progress; every other rank must still
reach the same collectives in the same order. So rank 0 broadcasts its result *or its error* (every rank
then raises alike and none waits for a tensor that never comes), its cancel decision (one broadcast per
question), and only rank 0 reports progress. All of it runs over the whole group (every CFG branch too).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from model.pipeline import Progress, RequestError
from parallel.group import Group


class RemoteError(RuntimeError):
    """Rank 0 failed before the collective work began (the message is rank 0's); the group is still usable."""


def _broadcast_object(group: Group, obj: Any) -> Any:
    box = [obj]
    if group.world_size > 1:
        dist.broadcast_object_list(box, src=0, device=group.device if group.backend == "nccl" else None)
    return box[0]


def share_result(group: Group, value: Any = None, error: BaseException | None = None) -> Any:
    """Rank 0's `value` — or its `error` — on every rank (a pickled broadcast; the others pass nothing).

    An error is raised on every rank: a RequestError as a RequestError (rank 0 raises its own object), anything
    else as RemoteError naming rank 0's exception, so every rank leaves the call alike."""
    payload = (("error", (type(error).__name__, str(error), isinstance(error, RequestError))) if error is not None
               else ("ok", value)) if group.rank == 0 else None
    kind, body = _broadcast_object(group, payload)
    if kind == "ok":
        return body
    name, msg, is_request = body
    if is_request:
        raise error if error is not None else RequestError(msg)
    raise RemoteError(f"rank 0: {name}: {msg}") from error


def share_tensors(group: Group, tensors: dict[str, torch.Tensor | None] | None, meta: Any = None,
                  error: BaseException | None = None) -> tuple[dict[str, torch.Tensor | None], Any]:
    """Rank 0's named tensors (None entries allowed) and picklable `meta` on every rank's device: their shapes
    and dtypes first (with rank 0's error instead, raised as `share_result` raises it), then each tensor."""
    spec = None
    if group.rank == 0 and error is None:
        spec = {"meta": meta, "tensors": {k: None if v is None else (tuple(v.shape), v.dtype)
                                          for k, v in (tensors or {}).items()}}
    spec = share_result(group, spec, error)
    out: dict[str, torch.Tensor | None] = {}
    for name, shape_dtype in spec["tensors"].items():
        if shape_dtype is None:
            out[name] = None
            continue
        shape, dtype = shape_dtype
        t = (tensors[name].to(group.device).contiguous() if group.rank == 0
             else torch.empty(shape, dtype=dtype, device=group.device))
        if group.world_size > 1:
            dist.broadcast(t, src=0)
        out[name] = t
    return out, spec["meta"]


def collective_cancel(group: Group, cancel: Callable[[], bool] | None) -> Callable[[], bool]:
    """A cancel check every rank calls at the same point: rank 0 asks `cancel`, every rank gets its answer
    (one broadcast per question)."""
    def collective() -> bool:
        mine = bool(group.rank == 0 and cancel is not None and cancel())
        if group.world_size == 1:
            return mine
        flag = torch.tensor([int(mine)], dtype=torch.int32, device=group.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())
    return collective


def rank0_progress(group: Group, progress: Callable[[Progress], None] | None) -> Callable[[Progress], None]:
    """A progress callback for every rank: each records its phase (the heartbeat shows it), rank 0 reports."""
    def on_step(p: Progress) -> None:
        group.phase = f"{p.stage} {p.step}/{p.total}"
        if progress and group.rank == 0:
            progress(p)
    return on_step
