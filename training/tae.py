"""Stage `tae`: a narrow TAEHV decoder (model/tae.py) for demo_model/, regressed onto its full VAE's decodes.

Data: clips of training/data.py encoded by the demo VAE (normalized posterior means: what the DiT makes and
what taew2_1 eats); the target is the full VAE's decode of those latents, not the clip: the tiny decoder
imitates the full one. Both are cached once in shards (resumable). Loss: MSE (+ optional L1) in pixel space
on the 1+4(F-1) output frames, unclamped. At the end: PSNR against the full decode on held-out clips, both
decoders timed on the same latents at one thread, and the decoder exported (fp16, decoder only) to
demo_model/taew2_1_demo.pth, with a copy in the stage's folder. Results: training/README.md.

    python -m training tae --threads 1 --max-minutes 40
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.checkpoint import ModelFolder
from model.tae import TAEHV, TinyDecoder, save_tae

from . import data
from .common import DEMO_MODEL, Log, fit, lr_at, save_atomic, setup, stage_device, write_json

if TYPE_CHECKING:  # diffusers (the full VAE) is imported only when the stage runs
    from model.vae import WanVAE

STAGE = "tae"
SHARD = 256
DEMO_WIDTHS = "32,16,8,8"
EXPORT_NAME = "taew2_1_demo.pth"


def load_vae(model_dir: Path) -> WanVAE:
    """The full VAE of a model folder, with the architecture its wanserve.json names."""
    from model.pipeline import component_archs
    from model.vae import WanVAE
    folder = ModelFolder.open(model_dir)
    return WanVAE.load(folder, None if folder.diffusers else component_archs(folder).vae)


def quantize(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 (the cache's targets; a step of 2/255 is ~59 dB, far below the errors measured)."""
    return ((video + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    return q.float() / 127.5 - 1


@torch.no_grad()
def build_cache(out: Path, vae: WanVAE, clips: int, seed: int, batch: int, quiet: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [N, z, F, h, w] and uint8 full-VAE decodes [N, 3, T, H, W] of clips seed*10^7 + i, i < clips,
    in shards of 256 under out/ (each shard is written once; a rerun reads it)."""
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (clips + SHARD - 1) // SHARD
    log = Log(out / "log.jsonl", n_shards, 0, desc=f"{STAGE} data", quiet=quiet)
    lats, targets = [], []
    for k in range(n_shards):
        path = out / f"shard_{k:04d}.pt"
        seeds = [seed * 10_000_000 + i for i in range(k * SHARD, min((k + 1) * SHARD, clips))]
        ck = torch.load(path, weights_only=True) if path.is_file() else None
        if ck is None or ck["seeds"] != seeds:
            zs, ys = [], []
            for b in range(0, len(seeds), batch):
                x, _ = data.batch(seeds[b:b + batch])
                z = vae.encode(x)
                zs.append(z)
                ys.append(quantize(vae.decode(z)))
            ck = {"seeds": seeds, "latents": torch.cat(zs), "targets": torch.cat(ys)}
            save_atomic(ck, path)
            log.step(k + 1, clips=seeds[-1] - seed * 10_000_000 + 1)
        log.advance()
        lats.append(ck["latents"])
        targets.append(ck["targets"])
    log.close()
    return torch.cat(lats)[:clips], torch.cat(targets)[:clips]


def tae_loss(tae: TAEHV, z: torch.Tensor, target: torch.Tensor, l1_weight: float):
    """MSE (+ l1_weight L1) of the unclamped decode ([B, 3, T, H, W], in [-1, 1] units) against target."""
    pred = tae.decode_frames(z.transpose(1, 2), fast=True).transpose(1, 2) * 2 - 1
    mse = (pred - target).pow(2).mean()
    l1 = (pred - target).abs().mean()
    return mse + l1_weight * l1, {"mse": mse.item(), "l1": l1.item()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB for videos in [-1, 1] (peak-to-peak 2), as training/vae.py's evaluate."""
    return float(10 * np.log10(4 / max((a - b).pow(2).mean().item(), 1e-12)))


@torch.no_grad()
def evaluate(tiny: TinyDecoder, vae: WanVAE, n: int = 32, seed: int = 79, score: bool = False) -> dict:
    """PSNR of the tiny decode against the full decode (and both against the clip) on held-out clips;
    with score, the adherence metric's all-4 rate on the tiny and on the full decodes."""
    from .quality import score as metric
    res: dict[str, list[float]] = {"psnr_vs_full_db": [], "full_vs_clip_db": [], "tiny_vs_clip_db": []}
    ok, ok_full = [], []
    for i in range(n):
        x, prompt, _ = data.clip(seed * 10_000_000 + i)
        z = vae.encode(x[None])
        full, small = vae.decode(z)[0], tiny.decode(z)[0]
        res["psnr_vs_full_db"].append(psnr(small, full))
        res["full_vs_clip_db"].append(psnr(full, x))
        res["tiny_vs_clip_db"].append(psnr(small, x))
        if score:
            ok.append(metric(small, prompt)["all4"])
            ok_full.append(metric(full, prompt)["all4"])
    out = {k: round(float(np.mean(v)), 2) for k, v in res.items()}
    out["psnr_vs_full_min_db"] = round(min(res["psnr_vs_full_db"]), 2)
    if score:
        out["tiny_metric_all4"], out["full_metric_all4"] = float(np.mean(ok)), float(np.mean(ok_full))
    return out


@torch.no_grad()
def time_decoders(tiny: TinyDecoder, vae: WanVAE, rounds: int = 25, seed: int = 79) -> dict:
    """Both decoders on the same latents (one 17-frame 64x64 clip: 5 x 8 x 8) at one thread, interleaved
    rounds after a warm-up; medians and the ratio of medians (and of the fastest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, _, _ = data.clip(seed * 10_000_000)
        z = vae.encode(x[None])
        for _ in range(3):
            vae.decode(z), tiny.decode(z)
        full, small = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            vae.decode(z)
            t1 = time.perf_counter()
            tiny.decode(z)
            t2 = time.perf_counter()
            full.append(t1 - t0)
            small.append(t2 - t1)
    finally:
        torch.set_num_threads(threads)
    med_f, med_s = statistics.median(full), statistics.median(small)
    return {"latents": list(z.shape), "full_ms": round(1e3 * med_f, 2), "tiny_ms": round(1e3 * med_s, 2),
            "speedup": round(med_f / med_s, 1), "speedup_fastest": round(min(full) / min(small), 1)}


def train(args) -> Path:
    setup(args.threads, args.seed, stage_device(args, cpu_only="tae"))
    out = Path(args.out) / STAGE
    vae = load_vae(Path(args.model))
    t0 = time.time()
    lats, targets = build_cache(out / "data", vae, args.clips, args.seed, args.data_batch, args.quiet)
    print(f"{STAGE}: {len(lats)} cached clips ({time.time() - t0:.0f} s)", flush=True)
    widths = tuple(int(v) for v in args.widths.split(","))
    model = TAEHV(vae.z_dim, widths, encoder=False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def loss_fn(step: int):
        idx = torch.randint(len(lats), (args.batch,), generator=gen)
        return tae_loss(model, lats[idx], dequantize(targets[idx]), args.l1_weight)

    def eval_fn(step: int) -> dict:
        model.eval()
        return evaluate(TinyDecoder(model), vae, n=args.eval_clips)

    t1 = time.time()
    step = fit(STAGE, out, args, model, opt, gen, loss_fn, eval_fn=eval_fn, eval_every=args.eval_every,
               lr_fn=lambda s: lr_at(s, args.lr, 100, args.steps, final_frac=0.05))
    train_s = time.time() - t1
    model.eval()
    final = save_tae(model, out / EXPORT_NAME, dtype=torch.float16, decoder_only=True)
    tiny = TinyDecoder.load(final)  # what ships: the fp16 file, computed in fp32
    res = {**evaluate(tiny, vae, n=args.final_clips, score=True), **time_decoders(tiny, vae)}
    dest = Path(args.dest)
    if args.dest:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(final.read_bytes())
    summary = {"steps": step, "widths": list(widths), "latent_channels": vae.z_dim, "clips": len(lats),
               "params": sum(p.numel() for p in model.parameters()), "file_bytes": final.stat().st_size,
               "train_seconds_this_run": round(train_s, 1), "exported_to": str(dest) if args.dest else None, **res}
    write_json(out / "summary.json", summary)
    print(f"{STAGE}: wrote {final}{f' and {dest}' if args.dest else ''}: {summary}", flush=True)
    return final


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=str(DEMO_MODEL), help="the model folder whose VAE is imitated")
    ap.add_argument("--dest", default=str(DEMO_MODEL / EXPORT_NAME), help="where the decoder is exported ('' : not)")
    ap.add_argument("--widths", default=DEMO_WIDTHS, help="decoder widths c0,c1,c2,c3 (taew2_1: 256,128,64,64)")
    ap.add_argument("--clips", type=int, default=2048, help="training clips (encoded and decoded once, cached)")
    ap.add_argument("--data-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--l1-weight", type=float, default=0.0, help="weight of an L1 term next to the MSE")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-clips", type=int, default=16)
    ap.add_argument("--final-clips", type=int, default=64)
    ap.add_argument("--seed", type=int, default=9)
