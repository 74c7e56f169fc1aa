"""Helpers of the Serve tests (tests/test_serve_*.py): tiny model folders, one Serve instance on a free
localhost port, an app per module, and an HTTP client whose every wait is bounded."""
from __future__ import annotations

import contextlib
import io
import socket
import time
from pathlib import Path

import numpy as np
import requests
import torch
from helpers import tiny_dit
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
WORDS = ("a red fox running through snow blue circle moving right paper boat on the river green square "
         "jumping over grass yellow star sky").split()
TERMINAL = ("completed", "failed", "cancelled")
DISTILL_CFG = str(REPO / "configs" / "tiny" / "distill_t2v.json")
BASE_CFG = str(REPO / "configs" / "tiny" / "base_t2v.json")
CAUSVID_CFG = str(REPO / "configs" / "tiny" / "causvid_t2v.json")
SMALL = {"size": "48x32", "num_frames": 5}  # W x H: 2 latent frames of 4 x 6

_serve_port: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_serve() -> int:
    """Start Serve once per test session (HTTP on a free localhost port); the ray_session fixture must be up."""
    global _serve_port
    from ray import serve

    if _serve_port is None:
        _serve_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _serve_port})
    return _serve_port


def write_models(root: Path) -> dict[str, Path]:
    """Tiny folders: a T2V one with distill + CausVid students, an I2V one with a distill student."""
    from model.archs import TINY_I2V, TINY_T2V
    from model.tiny import write_tiny_model

    t2v = root / "t2v"
    i2v = root / "i2v"
    if not (t2v / "config.json").exists():
        write_tiny_model(t2v, "t2v", words=WORDS, distill=tiny_dit(TINY_T2V, seed=21),
                         causal=tiny_dit(TINY_T2V, seed=22))
    if not (i2v / "config.json").exists():
        write_tiny_model(i2v, "i2v", words=WORDS, distill=tiny_dit(TINY_I2V, seed=23))
    return {"t2v": t2v, "i2v": i2v}


def write_lora(path: Path, rank_dim: int = 48) -> Path:
    """A rank-2 LoRA on the tiny T2V DiT's first query projection (dim 48; another rank_dim does not fit)."""
    g = torch.Generator().manual_seed(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(rank_dim, 2, generator=g) * 0.01,
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 48, generator=g) * 0.01},
              str(path))
    return path


def model_entry(name: str, path: Path, model_cls: str, task: str, config_json: str, **extra) -> dict:
    """A model of the app args sized for this machine: small bundles, one torch thread per rank."""
    return {"name": name, "model_path": str(path), "model_cls": model_cls, "task": task, "config_json": config_json,
            "num_threads": 1, "replica_cpus": 0.25, "rank_cpus": 0.25, "health_check_period_s": 1,
            "health_check_timeout_s": 20, "start_timeout_s": 120, "job_timeout_s": 120, **extra}


@contextlib.contextmanager
def serve_app(args: dict, name: str, router_env: dict | None = None):
    """Deploy build_app(args) at route "/" and yield its base URL; deleted afterwards."""
    from ray import serve

    from deployments.app import application

    port = ensure_serve()
    serve.run(application(args, router_env=router_env), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/healthz", timeout=5).json()["status"] == "ok", 60, "app healthy")
        yield url
    finally:
        serve.delete(name, _blocking=True)


def wait_until(cond, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the condition may not be ready yet
            last = e
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout} s (last error: {last!r})")


class Api:
    """requests against the app: base URL, bearer token, a timeout on every call."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, **kw) -> requests.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=kw.pop("timeout", self.timeout), **kw)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw):
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw):
        return self.request("DELETE", path, **kw)

    def submit(self, **body) -> dict:
        r = self.post("/v1/videos", json=body)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.get(f"/v1/videos/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float = 60, until=TERMINAL, poll: float = 0.05) -> dict:
        return wait_until(lambda: (j := self.job(job_id))["status"] in until and j, timeout,
                          f"job {job_id} reaching {until}", poll)


def decode(mp4: bytes, tmp: Path) -> np.ndarray:
    """uint8 [T, H, W, 3] of mp4 bytes (through model.video.read_mp4)."""
    from model.video import read_mp4

    path = tmp / f"v{time.monotonic_ns()}.mp4"
    path.write_bytes(mp4)
    frames, _ = read_mp4(path)
    return frames


def png_bytes(h: int = 40, w: int = 56, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
