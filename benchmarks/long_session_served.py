"""A served CausVid session without an end: past 1,100 latent frames through the real Serve app, memory flat.

Starts the demo app of configs/serve/demo.yaml (its CausVid model only; demo_model/) on localhost, opens one
session and asks for fragment after fragment over HTTP through the Python client, as a user would. Per
fragment: wall seconds (submit -> result), and what `GET /v1/sessions/{id}` reports (cache and memory bytes,
latent frames); the worker process's RSS from /proc. Prints JSON: the last-10 / first-10 fragment time ratio
(after `--warmup` fragments; goal <= 1.10), cache bytes constant once the window is full, session memory and
worker RSS growth over the second half (goal <= 5 %), and the whole video's frames (GET .../video, joined
from disk).

    python benchmarks/long_session_served.py [--fragments 230] [--out out/long_session]
"""
from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.demo import DEFAULT_CONFIG, PROMPT, load_app_config  # noqa: E402
from model.registry import CAUSVID  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def growth(values: list[float]) -> float:
    """Relative growth over the second half of a series: (last - middle) / middle."""
    mid = values[len(values) // 2]
    return (values[-1] - mid) / mid if mid else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fragments", type=int, default=230, help="fragments of the session (5 latent frames each)")
    ap.add_argument("--warmup", type=int, default=5, help="fragments left out of the time ratio")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "long_session")
    opts = ap.parse_args(argv)

    _, app = load_app_config(DEFAULT_CONFIG)
    args = copy.deepcopy(app["args"])
    args["models"] = [m for m in args["models"] if m["model_cls"] == CAUSVID.name]
    for m in args["models"]:
        m["model_path"] = str(REPO / m["model_path"])
        m["config_json"] = str(REPO / m["config_json"])
    model = args["models"][0]["name"]
    args["state_dir"] = str(opts.out / "state")
    args["image_roots"] = [str(opts.out / "state" / "uploads")]
    opts.out.mkdir(parents=True, exist_ok=True)

    import logging

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.client import WanClient

    port = free_port()
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app["name"], route_prefix=app.get("route_prefix", "/"))
        client = WanClient(f"http://127.0.0.1:{port}")
        gen = serve.get_deployment_handle(f"Generator-{model}", app_name=app["name"])
        pid = gen.health.remote().result(timeout_s=60)["ranks"][0]["pid"]
        session = client.session(model=model, prompt=PROMPT, seed=7)
        t_start = time.perf_counter()
        for k in range(opts.fragments):
            t0 = time.perf_counter()
            session.next_fragment().wait(timeout=300)
            seconds = time.perf_counter() - t0
            info = session.info()
            rows.append({"fragment": k + 1, "seconds": seconds, "latent_frames": info.get("latent_frames"),
                         "frames": info["frames"], "cache_bytes": info["cache_bytes"],
                         "memory_bytes": info["memory_bytes"], "worker_rss": rss(pid)})
            if (k + 1) % 10 == 0:
                print(f"fragment {k + 1}/{opts.fragments}: {seconds:.2f} s, {info['frames']} frames, memory "
                      f"{info['memory_bytes']} B, worker RSS {rows[-1]['worker_rss'] >> 20} MiB", file=sys.stderr)
        video = session.video(opts.out / "session.mp4")
        import imageio.v3 as iio

        frames = sum(1 for _ in iio.imiter(video))
        session.close()
    finally:
        serve.shutdown()
        ray.shutdown()

    times = [r["seconds"] for r in rows[opts.warmup:]]
    cache = [r["cache_bytes"] for r in rows]
    full = next(i for i, c in enumerate(cache) if c == cache[-1])
    result = {
        "fragments": len(rows), "latent_frames": rows[-1]["latent_frames"], "video_frames": rows[-1]["frames"],
        "video_frames_decoded_from_get": frames, "wall_s": round(time.perf_counter() - t_start, 1),
        "fragment_s_first10": round(statistics.mean(times[:10]), 4),
        "fragment_s_last10": round(statistics.mean(times[-10:]), 4),
        "fragment_time_ratio_last_first": round(statistics.mean(times[-10:]) / statistics.mean(times[:10]), 3),
        "cache_bytes": cache[-1], "cache_constant_from_fragment": full + 1,
        "cache_constant_after_full": all(c == cache[-1] for c in cache[full:]),
        "memory_bytes_first_last": [rows[0]["memory_bytes"], rows[-1]["memory_bytes"]],
        "memory_growth_second_half": round(growth([r["memory_bytes"] for r in rows]), 4),
        "worker_rss_mib_mid_last": [rows[len(rows) // 2]["worker_rss"] >> 20, rows[-1]["worker_rss"] >> 20],
        "worker_rss_growth_second_half": round(growth([r["worker_rss"] for r in rows]), 4),
    }
    (opts.out / "long_session.json").write_text(json.dumps({"summary": result, "fragments": rows}, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
