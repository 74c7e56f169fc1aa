"""Policy loops that never fail silently (router housekeeping, the replica's session sweep, block forwarding,
progress polling): each item runs in its own try; a failure is logged with the item's id, counted in
`wanserve_housekeeping_errors_total{loop}` (Ray's metrics agent) and in `counts`, and the loop goes on."""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

log = logging.getLogger("ray.serve")


class LoopErrors:
    """One per process. Thread-safe: retention rounds report from worker threads."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._metric = None
        import ray

        if ray.is_initialized():  # a metric needs Ray's metrics agent; unit tests run without one
            from ray.util import metrics

            self._metric = metrics.Counter("wanserve_housekeeping_errors_total",
                                           "items a policy loop failed on (the loop went on), by loop",
                                           tag_keys=("loop",))

    def record(self, loop: str, item: str, exc: BaseException) -> None:
        log.warning("%s: %s failed (the loop goes on; retried next round): %s: %s", loop, item,
                    type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))
        with self._lock:
            self.counts[loop] += 1
        if self._metric is not None:
            self._metric.inc(tags={"loop": loop})

    def reporter(self, loop: str) -> Callable[[str, BaseException], None]:
        """`on_error(item, exc)` for a store's retention round."""
        return lambda item, exc: self.record(loop, item, exc)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
