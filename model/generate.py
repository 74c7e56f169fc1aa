"""Command-line generation, shaped like LightX2V's inference entry:

    python -m model.generate --model_cls wan2.1_distill --task t2v --model_path MODEL \
        --config_json configs/wan21/wan_t2v_distill_4step.json --prompt "..." --save_result_path out/v.mp4

Bad input ends with a one-line error (exit 2), not a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import MODEL_CLASSES, TASKS, ConfigError, load_run_config
from .paths import PathNotAllowed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_cls", required=True, choices=MODEL_CLASSES)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model_path", required=True, help="Wan2.1 model folder (official or diffusers layout)")
    p.add_argument("--config_json", help="LightX2V-style config (configs/wan21/*.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--image_path", default=None, help="first frame for i2v")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--target_video_length", type=int, default=None, help="frames (4n+1)")
    p.add_argument("--target_height", type=int, default=None)
    p.add_argument("--target_width", type=int, default=None)
    p.add_argument("--save_result_path", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lora_root", action="append", default=None,
                   help="folder LoRA paths may point into (repeatable; default: the model folder and the "
                        "config's folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .pipeline import Cancelled, Progress, RequestError, WanPipeline  # heavy imports after --help

    try:
        cfg = load_run_config(args.config_json, model_cls=args.model_cls, task=args.task)
        roots = args.lora_root or [args.model_path] + ([str(Path(args.config_json).parent)] if args.config_json else [])
        image = None
        if args.task == "i2v":
            if not args.image_path:
                raise RequestError("task i2v needs --image_path (the first frame)")
            from PIL import Image
            try:
                image = Image.open(args.image_path).convert("RGB")
            except OSError as e:
                raise RequestError(f"cannot read image {args.image_path}: {e}") from None
        bar = tqdm(desc="denoise", unit="step")

        def progress(p: Progress):
            if p.stage == "dit":
                if p.step < bar.n or bar.total != p.total:  # a new fragment (CausVid) restarts the count
                    bar.reset(total=p.total)
                bar.update(p.step - bar.n)

        if args.model_cls == "wan2.1_causvid":
            if args.task != "t2v":
                raise RequestError("CausVid generates text-to-video only (task t2v)")
            from .causal_pipeline import CausVidPipeline
            pipe = CausVidPipeline.from_pretrained(args.model_path, cfg, device=args.device, lora_roots=roots)
            result = pipe.generate(args.prompt, args.seed, args.target_height, args.target_width,
                                   progress=progress)
        else:
            pipe = WanPipeline.from_pretrained(args.model_path, cfg, device=args.device, lora_roots=roots)
            result = pipe.generate(args.prompt, args.negative_prompt, image, args.seed, args.target_video_length,
                                   args.target_height, args.target_width, progress=progress)
        bar.close()
        path = result.save(args.save_result_path)
    except (ConfigError, CheckpointError, RequestError, PathNotAllowed, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("cancelled", file=sys.stderr)
        return 130
    summary = {"path": str(path), "frames": result.video.shape[1], "height": result.video.shape[2],
               "width": result.video.shape[3], "seed": result.seed, "nfe": result.nfe,
               "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
