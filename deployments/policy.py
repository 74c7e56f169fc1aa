"""Serve policy objects of the generator deployments: which replica a call goes to, how many replicas to run.

`PinnedRouter` (Serve's request router) sends a call made with `route_to=<replica id>` to that replica while
it lives, anything else to the replica with the shortest queue: the router, not Serve, picks replicas (it
holds the queue, the busy set and the session owners). `backlog_policy` (Serve's autoscaling policy) scales
on the router's backlog, which Serve cannot see. Why not consistent hashing, and the formula:
ARCHITECTURE.md, "Serve policy".
"""
from __future__ import annotations

import math
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTE_KWARG = "route_to"


class PinnedRouter(RequestRouter):
    """`route_to=<replica unique id>` pins a call; otherwise least queue over every replica."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        want = None
        if pending_request is not None and pending_request.kwargs:
            want = pending_request.kwargs.get(ROUTE_KWARG)
        if want:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == want]
            if pinned:
                return [pinned]
        return [candidate_replicas]


def backlog_policy(ctx) -> tuple[int, dict[str, Any]]:
    """Serve autoscaling policy on the replicas' `busy` and `backlog` stats (see the module docstring).

    Scale-up is immediate once the demand has lasted `upscale_delay_s`; scale-down waits
    `downscale_delay_s` of lower demand, so a short lull does not unload a 14B model.
    """
    cfg = ctx.config
    state = dict(ctx.policy_state or {})
    metrics = ctx.aggregated_metrics or {}
    busy = sum(metrics.get("busy", {}).values())
    backlog = max(metrics.get("backlog", {}).values(), default=0.0)
    target = getattr(cfg, "target_ongoing_requests", 1.0) or 1.0
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    want = max(lo, min(hi, math.ceil((busy + backlog) / target) if busy + backlog > 0 else lo))
    current = ctx.target_num_replicas
    now = ctx.current_time or 0.0
    if want == current:
        state.pop("since", None)
        return current, state
    direction = "up" if want > current else "down"
    if state.get("direction") != direction:
        state.update(direction=direction, since=now)
    delay = getattr(cfg, "upscale_delay_s", 0.0) if direction == "up" else getattr(cfg, "downscale_delay_s", 0.0)
    if now - state.get("since", now) >= delay:
        state.pop("since", None)
        state.pop("direction", None)
        return want, state
    return current, state
