"""Where a CausVid session's caches are: one enum for the workers, the replica's session policy and the API."""
from __future__ import annotations

from enum import Enum


class Tier(str, Enum):
    active = "active"  # on the compute device, ready for the next fragment
    idle = "idle"  # moved to CPU memory; moved back before the next fragment

    def __str__(self) -> str:
        return self.value
