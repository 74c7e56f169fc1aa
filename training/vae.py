"""Stage 1: train the tiny Wan VAE (diffusers AutoencoderKLWan) as an autoencoder on the synthetic clips.

Encode and decode go through the chunked causal path exactly as at inference, on whole 17-frame clips
(gradients flow through the feature caches); the loss weights the shape's pixels and adds a small KL. After
training, latents_mean / latents_std (posterior-mean statistics over 512 clips) go into wanserve.json so the
DiT sees unit-scale latents. Why each choice: ARCHITECTURE.md.

    python -m training vae --steps 1600 --batch 4
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from model.vae import WanVAE, vae_config, vae_key

from . import data
from .common import OUT, fit, lr_at, save_atomic, setup, stage_device, vae_arch, write_json

STAGE = "vae"


def clip_batch(step: int, batch: int, window: int, seed: int) -> torch.Tensor:
    """[B, 3, window, H, W] windows of the clips seed*10^7 + step*batch + i (deterministic)."""
    vids = []
    for i in range(batch):
        s = seed * 10_000_000 + step * batch + i
        frames = data.render(data.sample_spec(s))
        start = int(np.random.default_rng(s).integers(0, data.FRAMES - window + 1))
        vids.append(data.to_tensor(frames[start:start + window]))
    return torch.stack(vids)


def decode_unclamped(model: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` (the chunked causal path: one latent frame at a time through the feature
    cache) without its final clamp to [-1, 1], whose zero gradient would freeze overshooting pixels."""
    model.clear_cache()
    x = model.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        model._conv_idx = [0]
        outs.append(model.decoder(x[:, :, i:i + 1], feat_cache=model._feat_map, feat_idx=model._conv_idx,
                                  first_chunk=i == 0))
    model.clear_cache()
    return torch.cat(outs, 2)


def foreground_weight(x: torch.Tensor, fg_weight: float, edge_weight: float = 0.0) -> torch.Tensor:
    """[B, 1, T, H, W]: 1 on the background, + fg_weight where the clip differs from its background colour,
    + edge_weight on the 3-pixel band around the shape's outline.

    The shape covers ~8 % of the pixels, so an unweighted loss is dominated by the (easy) background and the
    shape's colour and outline come last; the weighting makes them count (the clip's first pixel is always
    background: shapes keep a margin from the border). What tells a square from a circle or a triangle is a
    few pixels at the corners: the edge band weighs the outline itself."""
    bg = x[:, :, :, :1, :1]
    fg = ((x - bg).abs().sum(1, keepdim=True) > 0.05).float()
    w = 1 + fg_weight * fg
    if edge_weight:
        grow = F.max_pool3d(fg, (1, 3, 3), 1, (0, 1, 1))
        shrink = -F.max_pool3d(-fg, (1, 3, 3), 1, (0, 1, 1))
        w = w + edge_weight * (grow - shrink)
    return w


def vae_loss(model: AutoencoderKLWan, x: torch.Tensor, gen: torch.Generator, kl_weight: float,
             fg_weight: float = 0.0, edge_weight: float = 0.0):
    post = model.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = decode_unclamped(model, z)
    w = foreground_weight(x, fg_weight, edge_weight)
    w = w / w.mean()
    l1 = ((rec - x).abs() * w).mean()
    mse = ((rec - x).pow(2) * w).mean()
    kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item(),
                                       "logvar": post.logvar.mean().item()}


@torch.no_grad()
def latent_stats(model: AutoencoderKLWan, n: int = 512, batch: int = 16, seed: int = 99) -> tuple[list, list]:
    mus = []
    for b in range(n // batch):
        x, _ = data.batch(range(seed * 10_000_000 + b * batch, seed * 10_000_000 + (b + 1) * batch))
        mus.append(model.encode(x).latent_dist.mean)
    mu = torch.cat(mus).transpose(0, 1).reshape(model.config.z_dim, -1)
    return mu.mean(1).tolist(), mu.std(1).tolist()


def official_state(model: AutoencoderKLWan, num_res_blocks: int) -> dict[str, torch.Tensor]:
    return {vae_key(k, num_res_blocks, to_diffusers=False): v.detach().clone() for k, v in model.state_dict().items()}


def init_vae(model: AutoencoderKLWan, init_logvar: float) -> None:
    """Kaiming-normal convolutions with zero biases, and a narrow initial posterior.

    diffusers' default init (PyTorch's uniform fan-in init, random biases) makes the tiny encoder's output
    nearly independent of its input: the signal shrinks through ~20 small convolutions while the biases do
    not, and the channel RMS norms then see mostly the bias direction (every clip encodes to the same mu
    and training stalls at the mean colour). Kaiming init keeps the signal. logvar starts at init_logvar
    (std 0.05 for -6): with logvar ~ 0 the sampled z would be mostly noise.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
        model.quant_conv.bias[model.config.z_dim:] = init_logvar


def train(args) -> Path:
    setup(args.threads, args.seed, stage_device(args, cpu_only="vae"))
    data.SIZE_RANGE = tuple(float(v) for v in args.sizes.split(","))
    data.TRAVEL_RANGE = tuple(float(v) for v in args.travel.split(","))
    out = Path(args.out) / STAGE
    model = AutoencoderKLWan(**vae_config(vae_arch()))
    model.use_tiling = model.use_slicing = False
    init_vae(model, args.init_logvar)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    step = fit(STAGE, out, args, model, opt, gen,
               lambda step: vae_loss(model, clip_batch(step, args.batch, args.window, args.seed), gen, args.kl_weight,
                                     args.fg_weight, args.edge_weight),
               lr_fn=lambda step: args.lr if args.schedule == "constant" else lr_at(step, args.lr, 100, args.steps))
    model.eval()
    mean, std = latent_stats(model)
    arch = vae_arch(mean, std)
    final = out / "vae_final.pt"
    save_atomic({"state": official_state(model, arch.num_res_blocks), "arch": arch.model_dump(mode="json")}, final)
    rec = evaluate(final)
    write_json(out / "summary.json", {"steps": step, "train_seconds_this_run": round(time.time() - t0, 1),
                                      "latents_mean": mean, "latents_std": std, **rec})
    print(f"{STAGE}: wrote {final}: {rec}")
    return final


def load_trained_vae(path: Path | None = None, device: str | torch.device = "cpu") -> WanVAE:
    from model.archs import VaeArch
    ck = torch.load(Path(path or OUT / STAGE / "vae_final.pt"), weights_only=True, map_location="cpu")
    return WanVAE.build(VaeArch(**ck["arch"]), ck["state"], device=device)


@torch.no_grad()
def evaluate(path: Path, n: int = 32, seed: int = 77) -> dict:
    """Reconstruction PSNR and metric agreement (attributes detected on reconstructions) on held-out clips."""
    from .quality import score
    vae = load_trained_vae(path)
    psnr, ok = [], []
    for i in range(n):
        x, prompt, _ = data.clip(seed * 10_000_000 + i)
        rec = vae.decode(vae.encode(x[None]))[0]
        mse = F.mse_loss(rec, x).item()
        psnr.append(10 * np.log10(4 / max(mse, 1e-10)))
        ok.append(score(rec, prompt)["all4"])
    return {"recon_psnr_db": round(float(np.mean(psnr)), 2), "recon_metric_all4": float(np.mean(ok))}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=17)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--init-logvar", type=float, default=-6.0)
    ap.add_argument("--fg-weight", type=float, default=9.0, help="extra loss weight on the shape's pixels")
    ap.add_argument("--edge-weight", type=float, default=0.0, help="extra loss weight on the outline band")
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                    help="cosine: warm-up + cosine decay over --steps; constant: --lr throughout (a later phase)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", default=",".join(str(v) for v in data.SIZE_RANGE), help="shape size range (pixels)")
    ap.add_argument("--travel", default=",".join(str(v) for v in data.TRAVEL_RANGE), help="travel range (pixels)")
