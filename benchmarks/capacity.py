"""Size a Wan2.1 deployment: FLOPs, SP bytes, memory, seconds per video and replicas, as JSON.

    python benchmarks/capacity.py --model 14B --size 832x480 --steps 4 --no-cfg --sp 8 --target-vpm 10
    python benchmarks/capacity.py --sp 8 --steps 4 --no-cfg --no-vae-parallel   # decode on rank 0 alone
    python benchmarks/capacity.py --calibration   # the fit to Wan2.1's published H100 times
    python benchmarks/capacity.py --table         # the README "Sizing a cluster" tables (markdown)

The model, its calibration and the tables live in the capacity/ package (capacity/README.md); this program
only parses the arguments and prints capacity.report's answers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import capacity as cap  # noqa: E402
from capacity import report  # noqa: E402
from model.config import ConfigError, ParallelConfig, parse_size  # noqa: E402


def size_arg(text: str) -> tuple[int, int]:
    """--size WIDTHxHEIGHT -> (height, width), through the one parser of sizes (model/config.py)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["1.3B", "14B"], default="14B")
    p.add_argument("--task", choices=["t2v", "i2v"], default="t2v")
    p.add_argument("--size", type=size_arg, default=(480, 832), metavar="WxH", help="width x height (832x480)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free guidance: two DiT forwards per step (--no-cfg for distilled models)")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel GPUs per replica (= ulysses x ring)")
    p.add_argument("--ulysses", type=int, help="Ulysses degree (default: all of --sp)")
    p.add_argument("--ring", type=int, help="ring degree (default: --sp / --ulysses)")
    p.add_argument("--cfg-parallel", type=int, choices=[1, 2], default=1,
                   help="2: cond and uncond on two SP groups (doubles the GPUs per replica)")
    p.add_argument("--dtype", choices=list(cap.DTYPES),
                   help="DiT weights (default bf16, fp8 with --fp8-compute; int8/fp8: weight-only, compute in "
                        "bf16; fp32: upstream Wan's master weights)")
    p.add_argument("--fp8-compute", action="store_true",
                   help="fp8 weights through scaled fp8 GEMMs at the FP8 peak (dit_fp8_compute; Ada/Hopper only)")
    p.add_argument("--fsdp", action="store_true", help="shard DiT and T5 weights over the SP group")
    p.add_argument("--offload", action="store_true", help="copy DiT and T5 host<->GPU for every video")
    p.add_argument("--vae-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="split the VAE decode (and I2V encode) by latent rows over the replica's GPUs (parallel."
                        "vae_parallel; on by default, no effect on one GPU); --no-vae-parallel: rank 0 alone")
    p.add_argument("--decoder", choices=list(cap.DECODERS), default="full",
                   help="full: the Wan2.1 VAE decoder; tiny: TAEHV's tiny decoder (use_tae), on rank 0, priced "
                        "from its FLOPs at the fitted VAE efficiency (uncalibrated)")
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
    return cap.Workload(model=args.model, task=args.task, height=args.size[0], width=args.size[1],
                        frames=args.frames, steps=args.steps, cfg=args.cfg, ulysses=u, ring=r,
                        cfg_parallel=args.cfg_parallel, dtype=args.dtype or ("fp8" if args.fp8_compute else "bf16"),
                        fsdp=args.fsdp, offload=args.offload, causvid_window=args.causvid_window,
                        fp8_compute=args.fp8_compute, vae_parallel=args.vae_parallel, decoder=args.decoder)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(report.readme_tables())
        return 0
    if args.calibration:
        print(json.dumps(report.calibration_json(), indent=2))
        print(report.fit_table(), file=sys.stderr)
        return 0
    try:
        w = workload(args)
        out = report.workload_json(w, args.gpu, args.target_vpm)  # refuses fp8 compute on a GPU without fp8
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
