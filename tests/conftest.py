import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (4 CPUs, 4 fake GPUs); tests share it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
