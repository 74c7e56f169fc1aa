"""Stage 2: encode a fixed set of synthetic clips with the trained VAE (normalized posterior means).

The teacher trains on these latents (no VAE in its loop). Clip i is `data.sample_spec(seed*10^7 + i)`;
shards of 256 clips are written as they finish, so the stage resumes after an interruption.

    python -m training latents --clips 8192
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import data
from .common import OUT, Log, save_atomic, setup
from .vae import load_trained_vae

STAGE = "latents"
SHARD = 256


def train(args) -> Path:
    setup(args.threads, 0)
    out = Path(args.out) / STAGE
    out.mkdir(parents=True, exist_ok=True)
    vae = load_trained_vae(Path(args.out) / "vae" / "vae_final.pt")
    n_shards = (args.clips + SHARD - 1) // SHARD
    done = sum((out / f"shard_{k:04d}.pt").is_file() for k in range(n_shards))
    log = Log(out / "log.jsonl", n_shards, done, desc=STAGE, quiet=args.quiet)
    wi, wn = (int(v) for v in args.worker.split("/"))
    for k in range(n_shards):
        path = out / f"shard_{k:04d}.pt"
        if path.is_file() or k % wn != wi:
            continue
        lats, prompts = [], []
        lo, hi = k * SHARD, min((k + 1) * SHARD, args.clips)
        for b in range(lo, hi, args.batch):
            seeds = [args.seed * 10_000_000 + i for i in range(b, min(b + args.batch, hi))]
            x, p = data.batch(seeds)
            lats.append(vae.encode(x).half())
            prompts += p
        save_atomic({"latents": torch.cat(lats), "prompts": prompts}, path)
        log.step(k + 1, clips=hi)
        log.advance()
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
