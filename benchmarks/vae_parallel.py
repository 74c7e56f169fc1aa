"""The Wan2.1 VAE split over ranks (parallel/vae.py): whole-video decode and encode, 1 rank vs 2 ranks, on CPU.

    python benchmarks/vae_parallel.py [--height 256 --width 256 --frames 5 --repeats 2 --ranks 2]

Release channel widths (base_dim 96, z 16; random weights: the time does not depend on them) at a reduced
spatial size. Each configuration runs in fresh spawned processes, one thread each, over gloo; the 1-rank
baseline runs the same way. Reported as one JSON object: medians of timed calls after a warm-up, the speedup,
the halo bytes each rank sent, and the largest difference from the 1-rank output (fp32).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def build(height: int, width: int, frames: int):
    from diffusers import AutoencoderKLWan

    from model.archs import VaeArch
    from model.vae import WanVAE, vae_config

    torch.manual_seed(0)
    vae = WanVAE(AutoencoderKLWan(**vae_config(VaeArch())))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, vae.z_dim, 1 + (frames - 1) // 4, height // 8, width // 8, generator=g)
    video = torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1
    return vae, latents, video


def worker(rank, world_size, addr, port, shape, repeats):
    import torch.distributed as dist

    from parallel.vae import SplitVAE

    vae, latents, video = build(*shape)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size)
        vae = SplitVAE(vae, dist.group.WORLD, rank, world_size)
    out = {}
    for what, call in (("decode", lambda: vae.decode(latents)), ("encode", lambda: vae.encode(video))):
        result = call()  # warm-up
        times = []
        for _ in range(repeats):
            if world_size > 1:
                dist.barrier()
            t0 = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - t0)
        out[what] = {"seconds": statistics.median(times), "result": result,
                     "halo_bytes": getattr(vae, "last_halo_bytes", 0)}
    if world_size > 1:
        dist.destroy_process_group()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args(argv)
    if args.height % 8 or args.width % 8 or (args.frames - 1) % 4:
        ap.error("height and width must be multiples of 8 and frames 4n+1")
    from engine.launch import run_local, values

    shape = (args.height, args.width, args.frames)
    one = values(run_local(worker, 1, args=(shape, args.repeats), timeout=3600))[0]
    many = values(run_local(worker, args.ranks, args=(shape, args.repeats), timeout=3600))
    report = {"benchmark": "vae_parallel", "vae": "Wan2.1 release widths (base_dim 96, z_dim 16), random weights",
              "size": f"{args.width}x{args.height}", "frames": args.frames, "ranks": args.ranks,
              "threads_per_rank": 1, "backend": "gloo", "machine": platform.processor() or platform.machine()}
    for what in ("decode", "encode"):
        ref = one[what]["result"]
        got = many[0][what]["result"]
        report[what] = {"seconds_1_rank": round(one[what]["seconds"], 3),
                        f"seconds_{args.ranks}_ranks": round(max(m[what]["seconds"] for m in many), 3),
                        "speedup": round(one[what]["seconds"] / max(m[what]["seconds"] for m in many), 3),
                        "max_abs_diff": float((got - ref).abs().max()),
                        "halo_bytes_per_rank": [m[what]["halo_bytes"] for m in many]}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
