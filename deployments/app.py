"""The Serve application: `import_path: deployments.app:build_app` in configs/serve/*.yaml.

    serve run configs/serve/demo.yaml            # from the repository root
    python -m deployments.demo                   # the same, plus a client run that writes out/*.mp4

`build_app(args)` validates the args (deployments/config.py: every bad key in one error), checks that each
model's config_json makes a valid run config, and returns a Router ingress bound to one Generator deployment
per model (ARCHITECTURE.md, "Processes"). Model folders are opened by the replicas (the GPU nodes), not here.
"""
from __future__ import annotations

from typing import Any

from ray import serve

from .config import AppArgs, ArgsError, parse_args
from .replica.deployment import generator_deployment
from .router.ingress import Router

ROUTER_NAME = "Router"


def check_models(args: AppArgs) -> None:
    """Each model's LightX2V config must load with its model_cls / task / sp_size (ArgsError otherwise)."""
    problems = []
    for spec in args.models:
        try:
            spec.run_config()
        except Exception as e:
            problems.append(f"models[{spec.name}]: {e}")
    if problems:
        raise ArgsError("invalid wanserve application args:\n  " + "\n  ".join(problems))


def build_app(args: dict[str, Any]):
    """The application for Serve's `import_path` (Serve calls it with the `args:` of the Serve config)."""
    return application(args)


def application(args: dict[str, Any], *, router_env: dict[str, str] | None = None):
    """build_app for Python callers, with router_env: environment variables of the router's process (e.g. the
    bearer token named by auth_token_env) when deploying from Python rather than from a cluster spec."""
    parsed = parse_args(args)
    check_models(parsed)
    generators = {spec.name: generator_deployment(spec).bind(spec.model_dump(mode="json"), parsed.lora_roots,
                                                              parsed.sessions.model_dump(mode="json"))
                  for spec in parsed.models}
    actor: dict[str, Any] = {"num_cpus": 0}
    if parsed.router_resources:
        actor["resources"] = dict(parsed.router_resources)
    if router_env:
        actor["runtime_env"] = {"env_vars": dict(router_env)}
    router = serve.deployment(Router).options(name=ROUTER_NAME, num_replicas=1, ray_actor_options=actor,
                                              max_ongoing_requests=1000, health_check_period_s=10)
    return router.bind(parsed.model_dump(mode="json"), **generators)
