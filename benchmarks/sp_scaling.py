"""Sequence-parallel scaling of one DiT forward on CPU: SP=1 vs SP=2 (Ulysses, ring), measured side by side.

    python benchmarks/sp_scaling.py [--frames 8 --height 64 --width 64 --layers 2 --repeats 3]

SP is only worth its communication if a forward at video lengths gets faster with more ranks. Each
configuration (1 process x 1 and 2 threads; 2 processes Ulysses and ring) runs in fresh processes; medians
of timed forwards, the share of time in collectives, CPU time per rank and the output's difference from
SP=1 are reported as one JSON object. The configurations and fields: ARCHITECTURE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from model.archs import DiTArch

ARCH = DiTArch(model_type="t2v", in_dim=16, out_dim=16, dim=256, ffn_dim=1024, freq_dim=256, text_dim=64,
               text_len=32, num_heads=2, num_layers=2)


def build(arch: DiTArch, frames: int, height: int, width: int):
    from model.dit import WanModel

    torch.manual_seed(0)
    dit = WanModel(arch).init_weights().eval()
    with torch.no_grad():
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    g = torch.Generator().manual_seed(1)
    kw = dict(x=torch.randn(1, arch.out_dim, frames, height, width, generator=g), t=torch.tensor([500.0]),
              context=torch.randn(1, arch.text_len, arch.text_dim, generator=g))
    return dit, kw


def bench_worker(rank, world_size, addr, port, mode, arch_json, shape, repeats):
    import torch.distributed as dist

    arch = DiTArch(**arch_json)
    dit, kw = build(arch, *shape)
    layout, group = None, None
    if world_size > 1:
        from parallel.attention import SequenceParallelLayout
        from parallel.group import GroupLayout, join

        lay = GroupLayout(ulysses=world_size) if mode == "ulysses" else GroupLayout(ring=world_size)
        group = join(rank, world_size, addr, port, lay, join_timeout=60, op_timeout=600)
        layout = SequenceParallelLayout(group)
        dit.layout = layout
    times, comms, cpus, sent = [], [], [], []
    with torch.no_grad():
        out = dit(**kw)  # warm-up
        for _ in range(repeats):
            if group:
                dist.barrier()
                layout.stats.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            out = dit(**kw)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            comms.append(layout.stats.seconds if layout else 0.0)
            sent.append(layout.stats.bytes_sent if layout else 0)
    if group:
        group.close()
    t = statistics.median(times)
    return {"rank": rank, "threads": torch.get_num_threads(), "forward_s": round(t, 4),
            "cpu_s": round(statistics.median(cpus), 4), "mb_sent": round(max(sent) / 2**20, 2),
            "comm_s": round(statistics.median(comms), 4), "comm_share": round(statistics.median(comms) / t, 4),
            "out": out if rank == 0 else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=64, help="latent height (tokens: /2)")
    p.add_argument("--width", type=int, default=64, help="latent width (tokens: /2)")
    p.add_argument("--layers", type=int, default=ARCH.num_layers)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="sp1_1thread,sp1_2threads,sp2_ulysses,sp2_ring")
    args = p.parse_args(argv)
    from engine.launch import run_local, values

    arch = ARCH.model_copy(update={"num_layers": args.layers})
    shape = (args.frames, args.height, args.width)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    runs = {}
    load_before = os.getloadavg()
    for mode in args.modes.split(","):
        world, threads, attn = {"sp1_1thread": (1, 1, None), "sp1_2threads": (1, 2, None),
                                "sp2_ulysses": (2, 1, "ulysses"), "sp2_ring": (2, 1, "ring")}[mode]
        t0 = time.perf_counter()
        ranks = values(run_local(bench_worker, world, args=(attn, arch.model_dump(), shape, args.repeats),
                                 timeout=900, threads=threads))
        runs[mode] = {"ranks": ranks, "wall_s": time.perf_counter() - t0}

    base = runs.get("sp1_1thread")
    report = {"tokens": tokens, "latent_shape": list(shape), "dtype": "float32",
              "arch": {k: getattr(arch, k) for k in ("dim", "num_heads", "head_dim", "ffn_dim", "num_layers")},
              "repeats": args.repeats, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.machine(), "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "configs": {}}
    for mode, run in runs.items():
        ranks = run["ranks"]
        t = max(r["forward_s"] for r in ranks)
        entry = {"processes": len(ranks), "threads_per_process": ranks[0]["threads"], "forward_s": t,
                 "per_rank_forward_s": [r["forward_s"] for r in ranks],
                 "per_rank_cpu_s": [r["cpu_s"] for r in ranks],
                 "per_rank_comm_s": [r["comm_s"] for r in ranks],
                 "per_rank_mb_sent": [r["mb_sent"] for r in ranks],
                 "per_rank_comm_share": [r["comm_share"] for r in ranks]}
        if base and mode != "sp1_1thread":
            entry["speedup_vs_sp1_1thread"] = round(base["ranks"][0]["forward_s"] / t, 3)
            entry["max_abs_diff_vs_sp1"] = float((ranks[0]["out"] - base["ranks"][0]["out"]).abs().max())
        report["configs"][mode] = entry
    if "sp1_2threads" in runs:
        t2 = runs["sp1_2threads"]["ranks"][0]["forward_s"]
        for mode in ("sp2_ulysses", "sp2_ring"):
            if mode in report["configs"]:
                report["configs"][mode]["speedup_vs_sp1_2threads"] = round(t2 / report["configs"][mode]["forward_s"], 3)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
