"""The Serve deployment of one model: its replica's placement group ([{CPU}] + [{CPU, GPU}] * sp_size,
STRICT_PACK: one node), health checks, the router-pinned request router and the backlog autoscaling policy."""
from __future__ import annotations

from typing import Any

from ray import serve

from ..config import ModelSpec
from .generator import Generator


def generator_deployment(spec: ModelSpec):
    """The Serve deployment of one model (options from its ModelSpec)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    opts: dict[str, Any] = dict(
        name=spec.deployment_name,
        ray_actor_options={"num_cpus": spec.replica_cpus},
        placement_group_bundles=spec.bundles(),
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=spec.max_ongoing_requests,
        health_check_period_s=spec.health_check_period_s,
        health_check_timeout_s=spec.health_check_timeout_s,
        graceful_shutdown_timeout_s=30,
        request_router_config=RequestRouterConfig(request_router_class="deployments.policy:PinnedRouter",
                                                  request_routing_stats_period_s=5),
    )
    if spec.autoscaling is not None:
        a = spec.autoscaling
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=a.min_replicas, max_replicas=a.max_replicas, initial_replicas=a.min_replicas,
            target_ongoing_requests=a.target_ongoing_requests, upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
            policy={"policy_function": "deployments.policy:backlog_policy"})
        opts["num_replicas"] = "auto"
    else:
        opts["num_replicas"] = spec.num_replicas
    return serve.deployment(Generator).options(**opts)
