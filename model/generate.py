"""Command-line generation, shaped like LightX2V's inference entry:

    python -m model.generate --model_cls MODEL_CLS --task t2v --model_path MODEL \
        --config_json configs/wan21/wan_t2v_distill_4step.json --prompt "..." --save_result_path out/v.mp4

MODEL_CLS is one of model/registry.py's classes (`--help` lists them). Bad input ends with a one-line
error (exit 2), not a traceback. `torchrun -m engine.generate` is the same command over a group of ranks:
both are `run_cli` (flags, image, request, progress bar, summary JSON, exit codes) around their own way of
producing the `Generation`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .compile import warm_up
from .config import TASKS, ConfigError, RunConfig, load_run_config
from .paths import PathNotAllowed
from .registry import NAMES, model_class

#: (args, cfg, request, progress) -> (the Generation, or None on a rank that writes nothing; extra summary fields).
#: `request()` builds the request (reading the image): call it where the request is needed, and only there.
Driver = Callable[[argparse.Namespace, RunConfig, Callable[[], Any], Callable], tuple[Any, dict]]


def parse_args(argv=None, prog: str = "python -m model.generate") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model_cls", required=True, choices=NAMES)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model_path", required=True, help="Wan2.1 model folder (official or diffusers layout)")
    p.add_argument("--config_json", help="LightX2V-style config (configs/wan21/*.json)")
    p.add_argument("--prompt", default=None, help="required, except with --prompt_schedule (its first prompt)")
    p.add_argument("--prompt_schedule", default=None,
                   help='CausVid: prompts with durations in fragments, as JSON: [["a red square", 2], ["a blue '
                        'square", 3]] (the prompt switches between fragments; the video has their total)')
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


def lora_roots(args: argparse.Namespace) -> list[str]:
    """--lora_root, or by default the model folder and the config's folder."""
    return args.lora_root or [args.model_path] + ([str(Path(args.config_json).parent)] if args.config_json else [])


def build_request(args: argparse.Namespace, cfg: RunConfig):
    """The request the flags describe (the i2v first frame read here: a bad one is a one-line RequestError)."""
    from .pipeline import Request, RequestError

    mc = model_class(cfg.model_cls)
    if args.task not in mc.tasks:
        raise RequestError(f"model_cls {mc.name} generates {' / '.join(mc.tasks)} only, not task {args.task}")
    image = None
    if args.task == "i2v":
        if not args.image_path:
            raise RequestError("task i2v needs --image_path (the first frame)")
        from PIL import Image
        try:
            image = Image.open(args.image_path).convert("RGB")
        except OSError as e:
            raise RequestError(f"cannot read image {args.image_path}: {e}") from None
    frames = None if mc.sessions else args.target_video_length  # sessions: num_fragments x num_frames
    schedule = None
    if args.prompt_schedule is not None:
        if not mc.sessions:
            raise RequestError(f"--prompt_schedule: only CausVid models switch prompts between fragments, not "
                               f"{mc.name}")
        try:
            schedule = json.loads(args.prompt_schedule)
        except json.JSONDecodeError as e:
            raise RequestError(f"--prompt_schedule is not JSON: {e}") from None
        if not isinstance(schedule, list) or not schedule:
            raise RequestError('--prompt_schedule: a JSON list of [prompt, fragments] pairs, e.g. [["a red square", 2]]')
        first = schedule[0][0] if isinstance(schedule[0], list) and schedule[0] else None
        if args.prompt is None:
            args.prompt = first
    if args.prompt is None:
        raise RequestError("--prompt is required (or --prompt_schedule)")
    return Request(args.prompt, args.negative_prompt, image, args.seed, frames, args.target_height,
                   args.target_width, schedule)


class _Bar:
    """The denoising progress bar, made on the first DiT step (a rank that reports nothing shows none)."""

    def __init__(self):
        self.bar = None

    def __call__(self, p) -> None:
        if p.stage != "dit":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="denoise", unit="step")
        if p.step < self.bar.n or self.bar.total != p.total:  # a new fragment (CausVid) restarts the count
            self.bar.reset(total=p.total)
        self.bar.update(p.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_cli(argv, prog: str, driver: Driver, log_level: int = logging.INFO,
            errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse the flags, load the config, let `driver` generate, save the mp4 and print the summary JSON.

    Exit codes: 0; 2 with one line on stderr for a bad config / request / file (and `errors`); 130 cancelled."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from .pipeline import Cancelled, RequestError  # heavy imports after --help

    bar = _Bar()
    try:
        cfg = load_run_config(args.config_json, model_cls=args.model_cls, task=args.task)
        result, extra = driver(args, cfg, lambda: build_request(args, cfg), bar)
        bar.close()
        if result is None:
            return 0
        path = result.save(args.save_result_path)
    except (ConfigError, CheckpointError, RequestError, PathNotAllowed, FileNotFoundError, *errors) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        bar.close()
        print("cancelled", file=sys.stderr)
        return 130
    print(json.dumps({"path": str(path), "frames": result.video.shape[1], "height": result.video.shape[2],
                      "width": result.video.shape[3], "seed": result.seed, "nfe": result.nfe, **extra,
                      "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}))
    return 0


def one_process(args: argparse.Namespace, cfg: RunConfig, request, progress) -> tuple[Any, dict]:
    """This process alone: the model class's whole pipeline (from the registry)."""
    req = request()  # before loading: a missing or unreadable image fails at once
    mc = model_class(cfg.model_cls)
    pipe = mc.pipeline_class().from_pretrained(args.model_path, cfg, device=args.device, lora_roots=lora_roots(args))
    extra = {"compile": warm_up(pipe)} if cfg.compile else {}  # the compile is not the request's
    if mc.sessions:  # block-by-block: num_fragments fragments of one throwaway session
        return pipe.generate(req.prompt, req.seed, req.height, req.width, progress=progress,
                             prompt_schedule=req.prompt_schedule), extra
    return pipe.generate(req.prompt, req.negative_prompt, req.image, req.seed, req.frames, req.height, req.width,
                         progress=progress), extra


def main(argv=None) -> int:
    return run_cli(argv, "python -m model.generate", one_process)


if __name__ == "__main__":
    sys.exit(main())
