"""What `compile` + warm-up buys: the first request with and without warm-up, and compiled vs eager steady state.

A small-but-real DiT (release head_dim 128, a few layers, 800 tokens; tiny text encoder and VAE) runs one
4-step request (no CFG: 4 DiT calls) in three fresh processes, each with an empty inductor cache (a new
replica): eager; compile without warm-up (the compile is paid inside the first request); compile with
warm-up (timed apart, then the first request). Each counts the dynamo frames its first request compiled.
Steady state: the fastest of 5 interleaved DiT forwards at the request's shape, eager and compiled, in
one process (this machine is shared: interleaving slows both alike). Prints JSON.

    python benchmarks/compile_warmup.py [--threads 2] [--device cpu|cuda] [--layers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import registry
from model.archs import DiTArch, latent_frames
from model.compile import warm_up
from model.config import load_run_config
from model.dit import WanModel
from model.pipeline import WanPipeline
from model.tiny import write_tiny_model

SIZE = {"target_video_length": 5, "target_height": 320, "target_width": 320}  # 2x40x40 latents -> 800 tokens
REQUEST = {**SIZE, "enable_cfg": False, "infer_steps": 4, "sample_shift": 5}
PROMPT = "a red square moving left on a blue background"
SCENARIOS = ("eager", "no_warmup", "warmup")


def arch(layers: int) -> DiTArch:
    return DiTArch(model_type="t2v", in_dim=4, out_dim=4, dim=512, ffn_dim=2048, freq_dim=256, text_dim=32,
                   text_len=64, num_heads=4, num_layers=layers)  # head_dim 128, as every Wan2.1 release


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def request_inputs(pipe: WanPipeline, device: str) -> tuple:
    a, (f, h, w) = pipe.arch, (latent_frames(SIZE["target_video_length"]), SIZE["target_height"] // 8,
                               SIZE["target_width"] // 8)
    return (torch.randn(1, a.out_dim, f, h, w, device=device),
            torch.full((1,), 500.0, dtype=torch.float64, device=device),
            torch.randn(1, a.text_len, a.text_dim, device=device))


def forward_seconds(dits: dict, inputs: tuple, device: str, repeats: int = 5) -> dict[str, float]:
    """Fastest of `repeats` DiT forwards per model, interleaved (a loaded machine slows both alike)."""
    runs: dict[str, list[float]] = {k: [] for k in dits}
    with torch.no_grad():
        for _ in range(repeats):
            for name, dit in dits.items():
                t0 = time.perf_counter()
                dit(*inputs)
                sync(device)
                runs[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in runs.items()}


def timed_request(pipe: WanPipeline) -> dict:
    """One request: total and DiT-stage seconds, and the dynamo frames it compiled."""
    frames = counters["frames"]["total"]
    gen = pipe.generate(PROMPT, seed=1)
    return {"total_s": gen.timings["total"], "dit_s": gen.timings["dit"],
            "compiled_frames": counters["frames"]["total"] - frames}


def scenario(name: str, root: str, device: str) -> dict:
    """One fresh process: load, (warm up), the first request, a second one; "warmup" also times the forwards of
    an eager copy of the same model against the compiled one."""
    cfg = load_run_config({**REQUEST, "compile": name != "eager"}, model_cls=registry.BASE.name)
    pipe = WanPipeline.from_pretrained(root, cfg, device=device)
    out = {}
    if name == "warmup":
        t0 = time.perf_counter()
        out["warmup_report"] = warm_up(pipe)
        out["warmup_s"] = time.perf_counter() - t0
    out["first"] = timed_request(pipe)
    out["later"] = timed_request(pipe)
    if name == "warmup":
        eager = WanPipeline.from_pretrained(root, cfg.model_copy(update={"compile": False}), device=device)
        out["forward_s"] = forward_seconds({"eager": eager.dit, "compiled": pipe.dit}, request_inputs(pipe, device),
                                           device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)  # the child processes
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scenario:
        print(json.dumps(scenario(args.scenario, args.root, args.device)))
        return
    a = arch(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dit = WanModel(a).init_weights()
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)
        root = write_tiny_model(Path(tmp) / "model", "t2v", dit=dit, words=PROMPT.split())
        res = {}
        for name in SCENARIOS:  # fresh process and empty inductor cache each: a new replica
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"inductor-{name}")}
            cmd = [sys.executable, __file__, "--scenario", name, "--root", str(root), "--threads", str(args.threads),
                   "--device", args.device, "--layers", str(args.layers)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"scenario {name} failed:\n{done.stderr[-3000:]}")
            res[name] = json.loads(done.stdout.strip().splitlines()[-1])
    e, n, w = (res[k] for k in SCENARIOS)

    def r(v: float) -> float:
        return round(v, 3)

    first = {"eager": e["first"], "compiled_no_warmup": n["first"], "compiled_after_warmup": w["first"]}
    print(json.dumps({
        "device": args.device, "threads": args.threads,
        "dit": {"dim": a.dim, "heads": a.num_heads, "head_dim": a.head_dim, "layers": a.num_layers,
                "tokens": a.num_tokens(latent_frames(SIZE["target_video_length"]), SIZE["target_height"] // 8,
                                       SIZE["target_width"] // 8)},
        "request": {"steps": REQUEST["infer_steps"], "cfg": False, **SIZE},
        "warmup_s": r(w["warmup_s"]),
        "first_request_dit_s": {k: r(v["dit_s"]) for k, v in first.items()},
        "first_request_total_s": {k: r(v["total_s"]) for k, v in first.items()},
        "first_request_compiled_frames": {k: v["compiled_frames"] for k, v in first.items()},
        "later_request_dit_s": {"eager": r(e["later"]["dit_s"]), "compiled": r(w["later"]["dit_s"])},
        "forward_s": {k: r(v) for k, v in w["forward_s"].items()},
        "ratios": {
            "first_request_dit_no_warmup_over_after_warmup": r(n["first"]["dit_s"] / w["first"]["dit_s"]),
            "first_request_dit_after_warmup_over_later": r(w["first"]["dit_s"] / w["later"]["dit_s"]),
            "eager_over_compiled_forward": r(w["forward_s"]["eager"] / w["forward_s"]["compiled"])},
    }, indent=1))


if __name__ == "__main__":
    main()
