"""The service's own metrics, exported through Ray's metrics agent (Prometheus at each node's metrics
port, and in the Ray dashboard): queue depth, job latency by stage, outcomes, failures by reason.

Names carry the `wanserve_` prefix (Ray adds `ray_`). Latency stages: `queue` (submit to start),
`text`, `image`, `dit`, `vae`, `mp4` (as the pipeline timed them), `total` (submit to the result on disk).
"""
from __future__ import annotations

import logging

log = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800]
STAGES = ("queue", "text", "image", "dit", "vae", "mp4", "total")


class Metrics:
    """Created once per router replica (Ray metrics must be made inside a Ray process)."""

    def __init__(self):
        from ray.util import metrics

        self.queue_depth = metrics.Gauge("wanserve_queue_depth", "jobs waiting in the router's queue",
                                         tag_keys=("model",))
        self.running = metrics.Gauge("wanserve_jobs_running", "jobs running on generator replicas",
                                     tag_keys=("model",))
        self.latency = metrics.Histogram("wanserve_job_latency_seconds", "job latency by stage",
                                         boundaries=LATENCY_BOUNDARIES, tag_keys=("model", "stage"))
        self.jobs = metrics.Counter("wanserve_jobs_total", "jobs that ended, by final state",
                                    tag_keys=("model", "state"))
        self.failures = metrics.Counter("wanserve_job_failures_total", "failed jobs and retries, by reason",
                                        tag_keys=("model", "reason"))
        self.rejected = metrics.Counter("wanserve_requests_rejected_total", "requests refused, by HTTP status",
                                        tag_keys=("status",))
        self.kernel = metrics.Gauge("wanserve_attention_kernel", "running replicas by the attention kernel they "
                                    "run, per attention (config key)", tag_keys=("model", "attention", "kernel"))
        self._kernel_tags: dict[str, set[tuple[str, str]]] = {}

    def depth(self, model: str, queued: int, running: int) -> None:
        self.queue_depth.set(queued, tags={"model": model})
        self.running.set(running, tags={"model": model})

    def kernels(self, model: str, runtimes: list[dict]) -> None:
        """Replicas per (attention, kernel); combinations no replica runs any more drop to 0."""
        counts: dict[tuple[str, str], int] = {}
        for rt in runtimes:
            for attention, kernel in (rt.get("attention") or {}).items():
                counts[(attention, kernel)] = counts.get((attention, kernel), 0) + 1
        for key in self._kernel_tags.get(model, set()) | counts.keys():
            self.kernel.set(counts.get(key, 0), tags={"model": model, "attention": key[0], "kernel": key[1]})
        self._kernel_tags[model] = self._kernel_tags.get(model, set()) | counts.keys()

    def finished(self, model: str, state: str, timings: dict[str, float] | None = None) -> None:
        self.jobs.inc(tags={"model": model, "state": state})
        for stage, seconds in (timings or {}).items():
            if stage in STAGES and seconds is not None and seconds >= 0:
                self.latency.observe(float(seconds), tags={"model": model, "stage": stage})

    def failure(self, model: str, reason: str) -> None:
        self.failures.inc(tags={"model": model, "reason": reason})

    def reject(self, status: int) -> None:
        self.rejected.inc(tags={"status": str(status)})
