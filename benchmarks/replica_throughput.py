"""Does adding a replica add throughput? 8 jobs queued at once, served by 1 replica, then by 2.

Same model and job as benchmarks/serve_overhead.py (the DiT dominates; one torch thread per replica's
worker, so two replicas fit two cores). The 8 jobs are submitted together; the clock stops when the last
one is completed (followed on the event streams, no polling). Prints JSON with `ratio` = time with 1
replica / time with 2 (goal >= 1.7) and how the jobs spread over the replicas. Other load on the machine
(`load_before`) directly caps the ratio: two workers cannot get two cores if something else holds one.
`machine_ceiling` runs the same jobs as direct pipeline calls (no Ray) in one process and in two: what two
single-threaded workers can gain on this machine at all (shared caches and memory bandwidth);
`ratio_of_ceiling` is the served ratio over it.

    python benchmarks/replica_throughput.py [--jobs 8] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_overhead import CONFIG, PROMPT, write_model  # noqa: E402


def follow(url: str, job_id: str) -> dict:
    import requests

    with requests.get(f"{url}/v1/videos/{job_id}/events", stream=True, timeout=600) as events:
        for line in events.iter_lines(decode_unicode=True):
            if line.startswith("data: ") and (ev := json.loads(line[6:]))["type"] == "job":
                if ev["job"]["status"] in ("completed", "failed", "cancelled"):
                    return ev["job"]
    raise RuntimeError(f"event stream of {job_id} ended early")


def _direct_worker(root: str, config: str, seeds: list[int]) -> None:
    import torch

    from model import registry
    from model.config import load_run_config
    from model.pipeline import WanPipeline
    from model.video import write_mp4

    torch.set_num_threads(1)
    pipe = WanPipeline.from_pretrained(Path(root), load_run_config(config, model_cls=registry.BASE.name, task="t2v"))
    pipe.generate(PROMPT, seed=0)  # warm-up, like the served runs
    barrier.wait()
    for seed in seeds:
        gen = pipe.generate(PROMPT, seed=seed)
        write_mp4(Path(root) / f"direct{seed}.mp4", gen.video, fps=gen.fps)


def _init(b) -> None:
    global barrier
    barrier = b


def ceiling(root: Path, config: Path, procs: int, jobs: int) -> float:
    """The machine's own limit: the same jobs as direct pipeline calls in `procs` processes (one torch thread
    each, no Ray), wall seconds from a common start after each process's warm-up."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    b = ctx.Barrier(procs + 1)
    with ctx.Pool(procs, initializer=_init, initargs=(b,)) as pool:
        res = [pool.apply_async(_direct_worker, (str(root), str(config), list(range(1 + k, jobs + 1, procs))))
               for k in range(procs)]
        b.wait(timeout=600)
        t0 = time.perf_counter()
        for r in res:
            r.get(timeout=1200)
        return time.perf_counter() - t0


def run(url: str, name: str, args: dict, replicas: int, jobs: int) -> dict:
    import requests
    from ray import serve

    from deployments.app import application

    args = json.loads(json.dumps(args))
    args["models"][0]["num_replicas"] = replicas
    args["state_dir"] += f"-{replicas}"
    serve.run(application(args), name=name, route_prefix="/")
    handle = serve.get_deployment_handle("Generator-bench", app_name=name)
    assert len(handle.broadcast("status").results(timeout_s=60)) == replicas
    warm = requests.post(url + "/v1/videos", json={"prompt": PROMPT, "seed": 0}, timeout=30).json()
    follow(url, warm["id"])
    t0 = time.perf_counter()
    ids = [requests.post(url + "/v1/videos", json={"prompt": PROMPT, "seed": i}, timeout=30).json()["id"]
           for i in range(1, jobs + 1)]
    done = [follow(url, i) for i in ids]
    wall = time.perf_counter() - t0
    assert all(j["status"] == "completed" for j in done), done
    serve.delete(name, _blocking=True)
    return {"wall_s": round(wall, 2), "jobs_per_min": round(60 * jobs / wall, 1),
            "job_s_median": round(sorted(j["timings"]["replica_total"] for j in done)[jobs // 2], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="UniPC steps per job (CFG doubles the DiT calls)")
    opts = ap.parse_args()
    import ray
    from ray import serve

    from model import registry

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_model(tmp / "model")
        config = tmp / "config.json"
        config.write_text(json.dumps({**CONFIG, "infer_steps": opts.steps}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        args = {"state_dir": str(tmp / "state"), "max_queued_jobs": 64, "models": [{
            "name": "bench", "model_path": str(root), "model_cls": registry.BASE.name, "task": "t2v",
            "config_json": str(config), "num_threads": 1, "replica_cpus": 0.5, "rank_cpus": 0.5}]}
        os.environ.setdefault("RAY_worker_niceness", "0")  # as the other processes on the machine
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            one = run(url, "bench1", args, 1, opts.jobs)
            two = run(url, "bench2", args, 2, opts.jobs)
        finally:
            serve.shutdown()
            ray.shutdown()
        direct1, direct2 = ceiling(root, config, 1, opts.jobs), ceiling(root, config, 2, opts.jobs)
    hw = direct1 / direct2
    ratio = one["wall_s"] / two["wall_s"]
    print(json.dumps({"ratio": round(ratio, 3), "goal": ">= 1.7", "jobs": opts.jobs,
                      "one_replica": one, "two_replicas": two,
                      "machine_ceiling": {"ratio": round(hw, 3), "one_process_s": round(direct1, 2),
                                          "two_processes_s": round(direct2, 2)},
                      "ratio_of_ceiling": round(ratio / hw, 3), "cores": os.cpu_count(),
                      "load_before": round(load, 2), "steps": opts.steps}, indent=1))


if __name__ == "__main__":
    main()
