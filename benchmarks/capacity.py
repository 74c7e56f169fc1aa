"""Size a Wan2.1 deployment: FLOPs, SP bytes, memory, seconds per video and replicas, as JSON.

    python benchmarks/capacity.py --model 14B --size 832x480 --steps 4 --no-cfg --sp 8 --target-vpm 10
    python benchmarks/capacity.py --calibration   # the fit to Wan2.1's published H100 times
    python benchmarks/capacity.py --table         # the README "Sizing a cluster" tables (markdown)

The model and its calibration live in parallel/capacity.py; this program only parses and prints.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ConfigError, ParallelConfig  # noqa: E402
from parallel import capacity as cap  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 832x480") from None
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["1.3B", "14B"], default="14B")
    p.add_argument("--task", choices=["t2v", "i2v"], default="t2v")
    p.add_argument("--size", type=parse_size, default=(832, 480), metavar="WxH", help="width x height (832x480)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free guidance: two DiT forwards per step (--no-cfg for distilled models)")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel GPUs per replica (= ulysses x ring)")
    p.add_argument("--ulysses", type=int, help="Ulysses degree (default: all of --sp)")
    p.add_argument("--ring", type=int, help="ring degree (default: --sp / --ulysses)")
    p.add_argument("--cfg-parallel", type=int, choices=[1, 2], default=1,
                   help="2: cond and uncond on two SP groups (doubles the GPUs per replica)")
    p.add_argument("--dtype", choices=list(cap.DTYPES), default="bf16",
                   help="DiT weights (int8/fp8: weight-only, compute in bf16; fp32: upstream Wan's master weights)")
    p.add_argument("--fsdp", action="store_true", help="shard DiT and T5 weights over the SP group")
    p.add_argument("--offload", action="store_true", help="copy DiT and T5 host<->GPU for every video")
    p.add_argument("--gpu", choices=sorted(cap.GPUS), default="H100")
    p.add_argument("--causvid-window", type=int, help="latent frames in a CausVid KV cache (default: the video)")
    p.add_argument("--target-vpm", type=float, help="target videos per minute: report replicas and GPUs")
    p.add_argument("--calibration", action="store_true", help="print the calibration fit and exit")
    p.add_argument("--table", action="store_true", help="print the README tables (markdown) and exit")
    return p


def workload(args) -> cap.Workload:
    if args.ulysses is None and args.ring is None:
        u, r = ParallelConfig(seq_p_size=args.sp).degrees()
    else:
        u, r = ParallelConfig(seq_p_size=args.sp if args.sp > 1 else (args.ulysses or 1) * (args.ring or 1),
                              ulysses_degree=args.ulysses, ring_degree=args.ring).degrees()
    return cap.Workload(model=args.model, task=args.task, width=args.size[0], height=args.size[1],
                        frames=args.frames, steps=args.steps, cfg=args.cfg, ulysses=u, ring=r,
                        cfg_parallel=args.cfg_parallel, dtype=args.dtype, fsdp=args.fsdp, offload=args.offload,
                        causvid_window=args.causvid_window)


# --------------------------------------------------------------------------------------------------
# Calibration and README tables
# --------------------------------------------------------------------------------------------------
def _row_json(r: cap.FitRow) -> dict:
    return {"task": r.task, "gpus": r.gpus, "published_s": r.published_s, "projected_s": round(r.projected_s, 1),
            "error": round(r.error, 4), "published_gb": r.published_gb, "projected_gb": round(r.projected_gb, 1),
            "memory_error": round(r.memory_error, 4)}


def calibration_json() -> dict:
    out = {}
    for gpu in sorted(set(cap.CALIBRATED_ON.values())):
        fit = cap.calibrate(gpu)
        c, link = fit.calibration, cap.GPUS[gpu].link_bw
        out[gpu] = {
            "mfu": round(c.mfu, 4), "vae_eff": round(c.vae_eff, 4), "comm_eff": round(c.comm_eff, 4),
            "comm_gb_per_s": round(c.comm_eff * link / cap.GB, 1),
            "comm_gb_per_s_range": [round(x * link / cap.GB, 1) for x in fit.comm_range],
            "range_tolerance": cap.RANGE_TOLERANCE, "vae_bytes_per_pixel": round(c.vae_bytes_per_pixel, 1),
            "source": c.source, "max_error": round(fit.max_error, 4),
            "points": [_row_json(r) for r in fit.rows],
            "t2v_only_fit_projecting_i2v": [_row_json(r) for r in cap.held_out(gpu)],
        }
    out["calibrated_on"] = cap.CALIBRATED_ON
    return out


def fit_table(gpu: str = "H100") -> str:
    lines = [f"| {gpu}: task, GPUs | published s | projected s | error | published peak GB | projected GB | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in cap.calibrate(gpu).rows:
        lines.append(f"| {r.task.upper()}-14B, {r.gpus} | {r.published_s:.1f} | {r.projected_s:.1f} | {r.error:+.1%} "
                     f"| {r.published_gb:.1f} | {r.projected_gb:.1f} | {r.memory_error:+.1%} |")
    return "\n".join(lines)


def speed_table(gpu: str = "H100", target_vpm: float = 10.0) -> str:
    lines = [f"| 14B T2V 832x480, 81 frames | SP | DiT s | VAE s | total s | videos/min per replica "
             f"| GPUs for {target_vpm:g} videos/min |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, steps, cfg in (("distill: 4 steps, no CFG", 4, False), ("base: 50 steps, CFG", 50, True)):
        for sp in (1, 2, 4, 8):
            w = cap.Workload(model="14B", steps=steps, cfg=cfg, ulysses=sp)
            p = cap.project(w, gpu)
            gpus = cap.replicas_for(target_vpm, p) * w.gpus
            lines.append(f"| {name} | {sp} | {p.dit_s:.1f} | {p.stages['vae']:.1f} | {p.total_s:.1f} "
                         f"| {p.videos_per_minute:.2f} | {gpus} |")
    return "\n".join(lines)


def causvid_table(gpu: str = "H100", node_gpus: int = 8) -> str:
    """Sessions per node: node_gpus replicas of SP 1, or one replica of SP node_gpus (rank 0 is the limit)."""
    lines = ["| CausVid, 832x480 (1560 tokens/frame) | DiT weights | window (latent frames) | SP | memory per "
             f"session (rank 0) | sessions per replica | sessions per {node_gpus}-GPU node |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, dtype, window in (("1.3B", "bf16", 21), ("1.3B", "bf16", 9), ("14B", "bf16", 21),
                                 ("14B", "int8", 21), ("14B", "int8", 9), ("14B", "fp8", 9)):
        for sp in (1, node_gpus):
            split = {"ring": sp} if model == "1.3B" else {"ulysses": sp}  # 12 heads: ring for 8 GPUs
            w = cap.Workload(model=model, dtype=dtype, steps=4, cfg=False, causvid_window=window, **split)
            m = cap.memory(w, gpu)
            lines.append(f"| {model} | {dtype} {m.dit_weights / cap.GB:.1f} GB | {window} | {sp} "
                         f"| {m.causvid_session / cap.GIB:.2f} GiB | {m.causvid_sessions} "
                         f"| {m.causvid_sessions * node_gpus // sp} |")
    return "\n".join(lines)


def readme_tables() -> str:
    fit, a100 = cap.calibrate("H100"), cap.calibrate("A100")
    c = fit.calibration
    link = cap.GPUS["H100"].link_bw / cap.GB
    lo, hi = (x * link for x in fit.comm_range)
    w8 = cap.Workload(model="14B", steps=4, cfg=False, ulysses=8)
    distill8 = cap.project(w8)
    slow8 = cap.project(w8, "H100", replace(c, comm_eff=fit.comm_range[0]))
    base8 = cap.project(replace(w8, steps=50, cfg=True))
    held = cap.held_out("H100")
    a100_with_h100_fit = [cap.project(cap.upstream_workload(p.gpus, t), "A100", c).total_s / p.seconds - 1
                          for t in ("t2v", "i2v") for p in cap.WAN21_PUBLISHED[("A100", t)]]
    return "\n\n".join([
        f"Projected on H100 SXM (one replica = SP GPUs, Ulysses, bf16 weights replicated, T5 and VAE on "
        f"GPU; VAE decode on one rank):\n\n{speed_table()}",
        f"4-step distill DiT at SP=8: {distill8.dit_s:.2f} s ({slow8.dit_s:.2f} s at the low end of the fitted "
        f"bandwidth range); base/distill: DiT time {base8.dit_s / distill8.dit_s:.1f}x, total "
        f"{base8.total_s / distill8.total_s:.1f}x.",
        f"CausVid sessions next to the weights (T5 and VAE resident, {cap.RESERVED_BYTES / cap.GB:.0f} GB reserved, "
        f"counted on rank 0, the busiest GPU of a replica; a session holds its share of the K/V of every layer "
        f"for the window (split over the SP group), its prompt's cross-attention K/V (on every rank) and the "
        f"streaming VAE decoder's state (fp32, rank 0). Idle sessions move to CPU memory and free all of it):"
        f"\n\n{causvid_table()}",
        f"Calibration: least squares on Wan2.1's published H100 14B 720p times (T2V 50 and I2V 40 steps, CFG; "
        f"1 GPU with offload, 2/4/8 GPUs FSDP + Ulysses). MFU {c.mfu:.3f} of 989 TFLOP/s BF16; VAE "
        f"{c.vae_eff:.3f} of 495 TFLOP/s TF32; collectives at {c.comm_eff * link:.0f} GB/s per rank "
        f"({lo:.0f}-{hi:.0f} GB/s keep every point within {cap.RANGE_TOLERANCE:.0%}); VAE decode working memory "
        f"{c.vae_bytes_per_pixel / 1e3:.1f} kB per output pixel, fitted to the 2/4/8-GPU T2V peaks (the 1-GPU "
        f"peaks check the activation formula).\n\n{fit_table('H100')}",
        f"Fitting the four T2V points alone reproduces them too but cannot tell serial VAE time from "
        f"collectives; projected with that fit, the I2V points come out "
        f"{min(r.error for r in held):+.1%} to {max(r.error for r in held):+.1%}. The A100 has its own fit "
        f"(Wan2.1's A800/A100 rows): MFU {a100.calibration.mfu:.2f}, collectives "
        f"{a100.calibration.comm_eff * cap.GPUS['A100'].link_bw / cap.GB:.0f} GB/s, max error "
        f"{a100.max_error:.1%}; with the H100's efficiencies the A100 points would come out "
        f"{min(a100_with_h100_fit):+.0%} to {max(a100_with_h100_fit):+.0%}. H200 projections use the "
        f"H100 fit; L40S projections use it too and are uncalibrated (no published Wan timing on Ada/PCIe).",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(readme_tables())
        return 0
    if args.calibration:
        print(json.dumps(calibration_json(), indent=2))
        print(fit_table(), file=sys.stderr)
        return 0
    try:
        w = workload(args)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cap.report(w, args.gpu, args.target_vpm), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
