"""Stage 2: encode a fixed set of synthetic clips with the trained VAE (normalized posterior means).

The teacher trains on these latents (no VAE in its loop). Clip i is `data.sample_spec(seed*10^7 + i)`;
shards of 256 clips are written as they finish, so the stage resumes after an interruption. With
`--procs N` the clips are rendered by N processes while this one encodes (on a GPU the rendering is the
slow part); the latents are the same either way.

    python -m training latents --clips 8192
    python -m training latents --clips 65536 --device cuda --batch 256 --procs 14
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch

from . import data
from .common import OUT, Log, save_atomic, setup, stage_device
from .vae import load_trained_vae

STAGE = "latents"
SHARD = 256


def render_batch(seeds: list[int]) -> tuple[np.ndarray, list[str]]:
    """uint8 [B, T, H, W, 3] frames and prompts of these clips (what `data.batch` renders, before to_tensor)."""
    specs = [data.sample_spec(int(s)) for s in seeds]
    return np.stack([data.render(sp) for sp in specs]), [sp.prompt for sp in specs]


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> [B, 3, T, H, W] in [-1, 1], exactly as data.to_tensor per clip."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def train(args) -> Path:
    dev = setup(args.threads, 0, stage_device(args))
    out = Path(args.out) / STAGE
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (args.clips + SHARD - 1) // SHARD
    done = sum((out / f"shard_{k:04d}.pt").is_file() for k in range(n_shards))
    wi, wn = (int(v) for v in args.worker.split("/"))
    todo = [k for k in range(n_shards) if k % wn == wi and not (out / f"shard_{k:04d}.pt").is_file()]
    batches = [(k, [args.seed * 10_000_000 + i for i in range(b, min(b + args.batch, (k + 1) * SHARD, args.clips))])
               for k in todo for b in range(k * SHARD, min((k + 1) * SHARD, args.clips), args.batch)]
    procs = max(1, getattr(args, "procs", 1))
    pool = mp.get_context("fork").Pool(procs) if procs > 1 else None  # before any CUDA work in this process
    seeds = [s for _, s in batches]
    rendered = pool.imap(render_batch, seeds) if pool else map(render_batch, seeds)
    vae = load_trained_vae(Path(args.out) / "vae" / "vae_final.pt", device=dev)
    log = Log(out / "log.jsonl", n_shards, done, desc=STAGE, quiet=args.quiet)
    lats, prompts = [], []
    try:
        for j, ((k, _), (frames, p)) in enumerate(zip(batches, rendered)):
            lats.append(vae.encode(to_video(frames)).half().cpu())
            prompts += p
            if j + 1 < len(batches) and batches[j + 1][0] == k:
                continue
            save_atomic({"latents": torch.cat(lats), "prompts": prompts}, out / f"shard_{k:04d}.pt")
            hi = min((k + 1) * SHARD, args.clips)
            lats, prompts = [], []
            log.step(k + 1, clips=hi)
            log.advance()
    finally:
        if pool:
            pool.terminate()
    log.close()
    return out


def load_latents(root: Path | None = None) -> tuple[torch.Tensor, list[str]]:
    d = Path(root or OUT) / STAGE
    lats, prompts = [], []
    for p in sorted(d.glob("shard_*.pt")):
        ck = torch.load(p, weights_only=True)
        lats.append(ck["latents"])
        prompts += ck["prompts"]
    if not lats:
        raise FileNotFoundError(f"no latent shards in {d}: run `python -m training latents` first")
    return torch.cat(lats).float(), prompts


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--clips", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--worker", default="0/1", help="i/n: this process writes the shards k with k %% n == i")
    ap.add_argument("--procs", type=int, default=1, help="processes rendering clips while this one encodes")
