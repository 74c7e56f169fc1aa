"""Local check of demo_model/: generate with the shipped weights through the real pipelines, write mp4s and
a PNG contact sheet, and score every clip against its prompt.

    python -m training.demo                       # teacher (50-step UniPC + CFG), 4-step student, causal student
    python -m training.demo --skip teacher --prompt "a green circle moving up on a white background"

Writes out/demo/<variant>_<i>.mp4, out/demo/contact_sheet.png (one row per clip: frames 0, 4, 8, 12, 16,
2x upscaled) and prints one JSON line per clip (path, prompt, adherence, detected attributes, seconds).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from model import registry

from .common import DEMO_MODEL, ROOT
from .quality import score

CONFIGS = {
    "teacher": (registry.BASE.name, "configs/tiny/base_t2v.json"),
    "distill": (registry.DISTILL.name, "configs/tiny/distill_t2v.json"),
    "causal": (registry.CAUSVID.name, "configs/tiny/demo_causvid_t2v.json"),
}
DEFAULT_PROMPTS = (
    "a red square moving right on a blue background",
    "a yellow circle moving down on a black background",
    "a white triangle moving left on a green background",
)


def load_pipeline(variant: str, model: Path, device: str = "cpu"):
    from model.config import load_run_config
    model_cls, config = CONFIGS[variant]
    cfg = load_run_config(ROOT / config, model_cls=model_cls, task="t2v")
    return cfg.model_class.pipeline_class().from_pretrained(model, cfg, device=device)


def skipped(variant: str, model: Path) -> bool:
    """The causal student is optional in a model folder: its variant is skipped when its folder is absent."""
    mc = registry.model_class(CONFIGS[variant][0])
    return mc.sessions and not (model / mc.student[0]).is_dir()


def generate(pipe, variant: str, prompt: str, seed: int):
    if pipe.cfg.model_class.sessions:
        return pipe.generate(prompt, seed=seed, num_fragments=1)
    return pipe.generate(prompt, seed=seed)


def contact_sheet(rows: list[np.ndarray], path: Path, frames=(0, 4, 8, 12, 16), scale: int = 2) -> Path:
    """rows: uint8 [T, H, W, 3] clips; one row of the listed frames each, separated by 2-pixel gaps."""
    lines = []
    for clip in rows:
        idx = [i for i in frames if i < len(clip)]
        gap = np.full((clip.shape[1], 2, 3), 255, np.uint8)
        tiles = [t for i in idx for t in (clip[i], gap)][:-1]
        lines.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in lines)
    lines = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in lines]
    sheet = np.concatenate(lines, axis=0)
    sheet = np.kron(sheet, np.ones((scale, scale, 1), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, sheet)
    return path


def main(argv=None) -> None:
    from model.video import read_mp4
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--out", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--prompt", action="append", help="grammar prompt (repeatable); default: three examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", action="append", default=[], choices=sorted(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, out = Path(args.model), Path(args.out)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    rows, results = [], []
    for variant in CONFIGS:
        if variant in args.skip or skipped(variant, model):
            continue
        pipe = load_pipeline(variant, model)
        for i, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            gen = generate(pipe, variant, prompt, args.seed + i)
            seconds = time.perf_counter() - t0
            path = gen.save(out / f"{variant}_{i}.mp4")
            frames, _ = read_mp4(path)
            rows.append(frames)
            r = score(path, prompt)
            rec = {"variant": variant, "mp4": str(path), "prompt": prompt, "seed": args.seed + i,
                   "adherence": r["adherence"], "full": r["full"], "detected": r["detected"],
                   "seconds": round(seconds, 3), "nfe": gen.nfe}
            results.append(rec)
            print(json.dumps(rec), flush=True)
    sheet = contact_sheet(rows, out / "contact_sheet.png")
    print(json.dumps({"contact_sheet": str(sheet), "rows": [f"{r['variant']}: {r['prompt']}" for r in results]}))


if __name__ == "__main__":
    main()
