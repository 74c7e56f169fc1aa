"""Peak memory of the decode + encode stage: the whole video decoded then encoded vs frames streamed into the
encoder as they decode (`WanPipeline.decode_mp4`).

    python benchmarks/mp4_stream.py [--frames 41 --height 480 --width 832]

The demo model's VAE on random latents at a real output size. Each mode runs in a fresh spawned process
(one thread); its peak resident memory above what it held before the stage (getrusage ru_maxrss) and its
wall time are reported as one JSON object, with the size of the whole video in fp32 for scale and whether
the two files are the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(rank, world_size, addr, port, mode, shape):
    import torch

    from model.pipeline import load_vae
    from model.video import encode_mp4

    frames, height, width = shape
    vae = load_vae(ROOT / "demo_model")
    latents = torch.randn(1, vae.z_dim, 1 + (frames - 1) // 4, height // 8, width // 8,
                          generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "whole":  # the path before: a [3, T, H, W] float video, its uint8 copy, then the encoder
        data, size = encode_mp4([vae.decode(latents)[0]])
    else:
        data, size = encode_mp4(c[0] for c in vae.decode_chunks(latents))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_above_start_bytes": max(0, peak - before), "size": size,
            "sha256": hashlib.sha256(data).hexdigest()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=41)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    args = ap.parse_args(argv)
    if args.height % 16 or args.width % 16 or (args.frames - 1) % 4:
        ap.error("height and width must be multiples of 16 and frames 4n+1")
    from engine.launch import run_local, values

    shape = (args.frames, args.height, args.width)
    out = {mode: values(run_local(worker, 1, args=(mode, shape), timeout=3600))[0] for mode in ("whole", "stream")}
    video_bytes = 3 * args.frames * args.height * args.width * 4
    report = {"benchmark": "mp4_stream", "vae": "demo_model", "frames": args.frames,
              "size": f"{args.width}x{args.height}", "video_fp32_bytes": video_bytes,
              "same_file": out["whole"]["sha256"] == out["stream"]["sha256"]}
    for mode, r in out.items():
        report[mode] = {"seconds": round(r["seconds"], 3), "peak_above_start_mb": round(r["peak_above_start_bytes"] / 2**20, 1)}
    report["peak_ratio_stream_over_whole"] = round(out["stream"]["peak_above_start_bytes"]
                                                   / max(1, out["whole"]["peak_above_start_bytes"]), 3)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
