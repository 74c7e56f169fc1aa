"""Parallel generation outside Ray, under torchrun — the same flags as `python -m model.generate`:

    torchrun --nproc_per_node 8 -m engine.generate --model_cls wan2.1 --task t2v --model_path MODEL \
        --config_json configs/wan21/wan_t2v_dist_cfg_ulysses.json --prompt "..." --save_result_path out/v.mp4

The config's `parallel` block (seq_p_size, seq_p_attn_type, cfg_p_size, ulysses_degree/ring_degree,
dit_fsdp) sets the group layout; torchrun's WORLD_SIZE must match it. Rank 0 encodes, writes the mp4 and
prints the JSON summary; every rank denoises. `--model_cls wan2.1_causvid` generates the config's
num_fragments fragments block by block, its K/V cache sharded over the group (parallel/causal.py).
Errors end with one line on stderr (exit 2).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from model.checkpoint import CheckpointError
from model.config import ConfigError, load_run_config
from model.generate import parse_args
from model.paths import PathNotAllowed

from parallel.group import GroupError, GroupLayout, RankFailure, default_device, join_from_env


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from model.pipeline import Cancelled, Request, RequestError

    from engine.causal_runner import CausalRunner, load_rank_causal_pipeline
    from engine.runner import ParallelRunner, RemoteError, load_rank_pipeline

    group = None
    try:
        cfg = load_run_config(args.config_json, model_cls=args.model_cls, task=args.task)
        device = default_device() if args.device == "cuda" else torch.device(args.device)
        group = join_from_env(GroupLayout.from_parallel(cfg.parallel), device=device)
        roots = args.lora_root or [args.model_path] + ([str(Path(args.config_json).parent)] if args.config_json else [])
        causvid = cfg.model_cls == "wan2.1_causvid"
        load = load_rank_causal_pipeline if causvid else load_rank_pipeline
        pipe = load(args.model_path, cfg, group.rank, device, lora_roots=roots)
        runner = (CausalRunner if causvid else ParallelRunner)(pipe, group)
        request = None
        if group.rank == 0:
            image = None
            if args.task == "i2v":
                if not args.image_path:
                    raise RequestError("task i2v needs --image_path (the first frame)")
                from PIL import Image

                image = Image.open(args.image_path).convert("RGB")
            frames = None if causvid else args.target_video_length  # CausVid: num_fragments x num_frames
            request = Request(args.prompt, args.negative_prompt, image, args.seed, frames, args.target_height,
                              args.target_width)
        result = runner.generate(request)
        if result is not None:
            path = result.save(args.save_result_path)
            print(json.dumps({"path": str(path), "frames": result.video.shape[1], "height": result.video.shape[2],
                              "width": result.video.shape[3], "seed": result.seed, "nfe": result.nfe,
                              "world_size": group.world_size,
                              "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}))
    except (ConfigError, CheckpointError, RequestError, RemoteError, PathNotAllowed, FileNotFoundError, OSError,
            GroupError, RankFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("cancelled", file=sys.stderr)
        return 130
    finally:
        if group is not None:
            group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
