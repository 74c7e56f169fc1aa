"""What serving costs: the same job through the whole Serve app over HTTP vs a direct pipeline call.

Direct: `WanPipeline.generate` + `write_mp4` in this process; served: POST /v1/videos to a real Serve app on
localhost, followed on its event stream, then GET /content. Both produce the same mp4 and alternate at the
same priority; the job is sized like real work (a couple of seconds). Prints JSON with `ratio` = served /
direct (goal <= 1.10). The setup in full: ARCHITECTURE.md.

    python benchmarks/serve_overhead.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import registry  # noqa: E402
from model.archs import DiTArch  # noqa: E402
from model.config import load_run_config  # noqa: E402
from model.dit import WanModel  # noqa: E402
from model.tiny import write_tiny_model  # noqa: E402

ARCH = DiTArch(model_type="t2v", in_dim=4, out_dim=4, dim=512, ffn_dim=2048, freq_dim=256, text_dim=32,
               text_len=16, num_heads=8, num_layers=8)
CONFIG = {"infer_steps": 20, "target_video_length": 9, "target_height": 64, "target_width": 96, "text_len": 16,
          "sample_shift": 5, "sample_guide_scale": 5, "enable_cfg": True}
PROMPT = "a red square moving left on a blue background"


def write_model(root: Path) -> Path:
    torch.manual_seed(0)
    dit = WanModel(ARCH).init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    return write_tiny_model(root, "t2v", dit=dit, words=PROMPT.split())


def measure(root: Path, config: Path, repeats: int, tmp: Path) -> tuple[list[float], list[float], list[dict]]:
    """Direct and served runs, alternating (so both meet the same machine load), after one warm-up each."""
    import os

    import ray
    import requests
    from ray import serve

    from deployments.app import application
    from model.pipeline import WanPipeline
    from model.video import write_mp4

    torch.set_num_threads(1)
    pipe = WanPipeline.from_pretrained(root, load_run_config(config, model_cls=registry.BASE.name, task="t2v"))

    def direct(i: int) -> float:
        t0 = time.perf_counter()
        gen = pipe.generate(PROMPT, seed=i)
        write_mp4(tmp / f"direct{i}.mp4", gen.video, fps=gen.fps)
        return time.perf_counter() - t0

    def served(i: int) -> tuple[float, dict]:
        t0 = time.perf_counter()
        job = requests.post(url + "/v1/videos", json={"prompt": PROMPT, "seed": i}, timeout=30).json()
        with requests.get(f"{url}/v1/videos/{job['id']}/events", stream=True, timeout=60) as events:
            for line in events.iter_lines(decode_unicode=True):  # pushed: no polling load on the machine
                if line.startswith("data: ") and (ev := json.loads(line[6:]))["type"] == "job":
                    job = ev["job"]
                    if job["status"] in ("completed", "failed", "cancelled"):
                        break
        assert job["status"] == "completed", job
        assert requests.get(url + job["url"], timeout=30).content[4:8] == b"ftyp"
        return time.perf_counter() - t0, job

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = {"state_dir": str(tmp / "state"), "models": [{
        "name": "bench", "model_path": str(root), "model_cls": registry.BASE.name, "task": "t2v",
        "config_json": str(config), "num_threads": 1, "replica_cpus": 0.5, "rank_cpus": 0.5}]}
    # Ray runs its workers at niceness 15; the direct call here runs at 0. Same priority for both, so that
    # other load on the machine slows them alike.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(args), name="bench", route_prefix="/")
        direct(0), served(0)  # warm-up
        d, s, jobs = [], [], []
        for i in range(1, repeats + 1):
            d.append(direct(i))
            t, job = served(i)
            s.append(t)
            jobs.append(job)
        return d, s, jobs
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_model(tmp / "model")
        config = tmp / "config.json"
        config.write_text(json.dumps(CONFIG))
        d, s, jobs = measure(root, config, opts.repeats, tmp)
    d_med, s_med = statistics.median(d), statistics.median(s)
    replica = statistics.median(j["timings"]["replica_total"] for j in jobs)
    print(json.dumps({
        "ratio": round(s_med / d_med, 3), "goal": "<= 1.10",
        "direct_s": round(d_med, 3), "served_s": round(s_med, 3), "overhead_s": round(s_med - d_med, 3),
        "served_replica_s": round(replica, 3),
        "job": {**{k: CONFIG[k] for k in ("infer_steps", "target_video_length", "target_height", "target_width")},
                "cfg": True, "dit": f"dim {ARCH.dim} x {ARCH.num_layers} layers"},
        "repeats": opts.repeats, "direct_runs_s": [round(x, 3) for x in d], "served_runs_s": [round(x, 3) for x in s],
    }, indent=1))


if __name__ == "__main__":
    main()
