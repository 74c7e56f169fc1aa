"""Our DiT forward against diffusers' `WanTransformer3DModel` on the same weights (CPU, fp32, one thread).

Owning model/dit.py is only worth it if it is no slower than the reference implementation we test it
against. Both models get Wan2.1-1.3B widths (dim 1536, 12 heads of 128, ffn 8960) but only a few layers,
the same random weights (our official names converted by model/checkpoint.py) and the same inputs
(2,880 video tokens, 512 text tokens). Runs alternate (ours, theirs, ours, ...) so the shared machine's
noise hits both sides; the best of each is compared. Prints one JSON object with `ratio` = ours / diffusers
(goal <= 0.90) and the outputs' max abs difference (goal <= 1e-5); --profile adds our top ops by self CPU
and both sides' time in GEMMs + attention (identical kernels: diffusers' share of it is the ratio's floor).

    python benchmarks/dit_vs_diffusers.py [--layers 2] [--repeats 3] [--profile]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def build(layers: int, seed: int = 0):
    """Ours with random weights (norm weights around 1) and diffusers' model loaded from the same state dict."""
    from diffusers import WanTransformer3DModel

    from model.archs import WAN21_T2V_1_3B
    from model.checkpoint import to_diffusers_dit
    from model.dit import WanModel

    arch = WAN21_T2V_1_3B.model_copy(update={"num_layers": layers})
    torch.manual_seed(seed)
    ours = WanModel(arch).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn_like(p))
    cfg = {k: v for k, v in arch.to_diffusers_config().items() if not k.startswith("_") and k != "text_len"}
    theirs = WanTransformer3DModel(**cfg).eval()
    theirs.load_state_dict(to_diffusers_dit(ours.state_dict()), strict=True)
    return ours, theirs


def inputs(frames: int, height: int, width: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, height, width, generator=g)
    context = 0.1 * torch.randn(1, 512, 4096, generator=g)
    return x, torch.tensor([937.5]), context


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


KERNEL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")


def profile_summary(fn, top: int) -> dict:
    """Top ops by self CPU time, and the time in GEMMs + attention: the same kernels on both sides, so that
    share of diffusers' time bounds how far below it any rewrite of the rest can go."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    kernels = sum(e.self_cpu_time_total for e in events if e.key in KERNEL_OPS)
    return {"total_s": round(total / 1e6, 3), "gemm_attention_s": round(kernels / 1e6, 3),
            "top": [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                     "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grid", type=int, nargs=3, default=(5, 36, 64), metavar=("F", "H", "W"),
                    help="latent frames, height, width (patch 1x2x2: 5*18*32 = 2880 tokens)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side, interleaved")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="add our top ops by self CPU time, and both sides' time in GEMMs + attention")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))

    torch.set_num_threads(args.threads)
    ours, theirs = build(args.layers)
    x, t, context = inputs(*args.grid)
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)

    def run_ours():
        return ours(x, t, context)

    def run_theirs():
        return theirs(x, t, context, return_dict=False)[0]

    with torch.inference_mode():
        a, b = run_ours(), run_theirs()  # warm-up, and the outputs compared
        diff = (a - b).abs().max().item()
        ours_s, theirs_s = [], []
        for _ in range(args.repeats):
            ours_s.append(timed(run_ours))
            theirs_s.append(timed(run_theirs))
        result = {"tokens": tokens, "layers": args.layers, "threads": torch.get_num_threads(),
                  "ours_s": round(min(ours_s), 3), "diffusers_s": round(min(theirs_s), 3),
                  "ratio": round(min(ours_s) / min(theirs_s), 3), "max_abs_diff": diff,
                  "output_max": a.abs().max().item(), "ours_all_s": [round(s, 3) for s in ours_s],
                  "diffusers_all_s": [round(s, 3) for s in theirs_s]}
        if args.profile:
            ours_p, theirs_p = profile_summary(run_ours, args.top), profile_summary(run_theirs, 0)
            result["profile"] = {
                "diffusers_total_s": theirs_p["total_s"], "diffusers_gemm_attention_s": theirs_p["gemm_attention_s"],
                "ours_total_s": ours_p["total_s"], "ours_gemm_attention_s": ours_p["gemm_attention_s"],
                "ratio_floor": round(theirs_p["gemm_attention_s"] / theirs_p["total_s"], 3), "ours_top": ours_p["top"]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
