"""Base (50-step UniPC + CFG = 100 DiT calls) vs step-distilled (4 steps, no CFG) on the same model, one run.

The model is sized so the DiT dominates a request, as it does at 14B (a mid-size DiT over ~900 tokens, tiny
text encoder and VAE). Each configuration runs `--repeats` times and the fastest run counts (the least
disturbed by other load). Prints JSON: {"dit_ratio", "e2e_ratio", "nfe_base", "nfe_distill", ...}.

    python benchmarks/distill_speedup.py [--repeats 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import registry  # noqa: E402
from model.archs import DiTArch  # noqa: E402
from model.config import load_run_config  # noqa: E402
from model.dit import WanModel  # noqa: E402
from model.pipeline import WanPipeline  # noqa: E402
from model.tiny import write_tiny_model  # noqa: E402

ARCH = DiTArch(model_type="t2v", in_dim=4, out_dim=4, dim=512, ffn_dim=2048, freq_dim=256, text_dim=32,
               text_len=64, num_heads=8, num_layers=8)
SIZE = {"target_video_length": 21, "target_height": 192, "target_width": 192}  # 6x24x24 latents -> 864 tokens
BASE = {**SIZE, "infer_steps": 50, "sample_shift": 5, "sample_guide_scale": 5, "enable_cfg": True}
DISTILL = {**SIZE, "enable_cfg": False, "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5}


def best_run(pipe: WanPipeline, repeats: int) -> dict:
    runs = [pipe.generate("a red square moving left on a blue background", seed=i) for i in range(repeats)]
    best = min(runs, key=lambda r: r.timings["total"])
    return {"nfe": best.nfe, "dit_s": min(r.timings["dit"] for r in runs), "total_s": best.timings["total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dit = WanModel(ARCH).init_weights()
        root = write_tiny_model(Path(tmp) / "model", "t2v", dit=dit, distill=dit,
                                words="a red square moving left on blue background".split())
        base = WanPipeline.from_pretrained(root, load_run_config(BASE, model_cls=registry.BASE.name))
        distill = WanPipeline.from_pretrained(root, load_run_config(DISTILL, model_cls=registry.DISTILL.name))
        distill.generate("warm up", seed=0)  # first-call allocations out of the timing
        d = best_run(distill, max(args.repeats, 3))
        b = best_run(base, args.repeats)
    tokens = ARCH.num_tokens(6, 24, 24)
    print(json.dumps({
        "dit_ratio": round(b["dit_s"] / d["dit_s"], 2),
        "e2e_ratio": round(b["total_s"] / d["total_s"], 2),
        "nfe_base": b["nfe"], "nfe_distill": d["nfe"],
        "base": {k: round(v, 3) for k, v in b.items()},
        "distill": {k: round(v, 3) for k, v in d.items()},
        "model": {"dim": ARCH.dim, "layers": ARCH.num_layers, "tokens": tokens, "threads": args.threads},
    }))


if __name__ == "__main__":
    main()
