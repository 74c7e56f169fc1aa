"""Parallel generation outside Ray, under torchrun — the same flags and output as `python -m model.generate`:

    torchrun --nproc_per_node 8 -m engine.generate --model_cls MODEL_CLS --task t2v --model_path MODEL \\
        --config_json configs/wan21/wan_t2v_dist_cfg_ulysses.json --prompt "..." --save_result_path out/v.mp4

The config's `parallel` block sets the group layout (torchrun's WORLD_SIZE must match it). Rank 0 encodes,
writes the mp4 and prints the JSON summary (with `world_size`); every rank denoises. A model class with
sessions generates the config's num_fragments fragments block by block, its K/V cache sharded over the
group (parallel/causal.py). Errors end with one line on stderr (exit 2).
"""
from __future__ import annotations

import logging
import sys

import torch

from model.generate import lora_roots, run_cli
from model.pipeline import RequestError
from parallel.group import GroupError, GroupLayout, RankFailure, default_device, join_from_env

from .protocol import RemoteError, share_result
from .rank import load_rank_pipeline, rank_runner


def on_group(args, cfg, request, progress):
    """This rank's share: join torchrun's group, load its part of the pipeline, run; rank 0 gets the video."""
    device = default_device() if args.device == "cuda" else torch.device(args.device)
    group = join_from_env(GroupLayout.from_parallel(cfg.parallel), device=device)
    try:
        pipe = load_rank_pipeline(args.model_path, cfg, group.rank, device, lora_roots=lora_roots(args))
        runner = rank_runner(pipe, group)
        runner.warm_up()  # `compile`: before the request, on every rank
        req, error = None, None
        if group.rank == 0:
            try:
                req = request()
            except RequestError as e:  # a bad flag or image: every rank ends with it, none waits for rank 0
                error = e
        with group.watch("request", benign=(RequestError,)):
            share_result(group, None, error)
        result = runner.generate(req, progress=progress)
        return result, {"world_size": group.world_size, **({"compile": runner.warmup} if pipe.cfg.compile else {})}
    finally:
        group.close()


def main(argv=None) -> int:
    return run_cli(argv, "torchrun -m engine.generate", on_group, log_level=logging.WARNING,
                   errors=(RemoteError, OSError, GroupError, RankFailure))


if __name__ == "__main__":
    sys.exit(main())
