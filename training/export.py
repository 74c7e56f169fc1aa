"""Stage 9: write demo_model/ in the official Wan2.1 layout (model/tiny.py `write_tiny_model`).

Teacher, 4-step student and causal student as bf16 DiTs (the loaders cast to the compute dtype; the folder
stays under 30 MB), the VAE, the frozen random umT5, the grammar's tokenizer, wanserve.json and
TRAINING.json (provenance). `--distill-from` / `--causal-from` pick the stage of each student and
`--distill ema|state` a DMD generator's EMA or raw weights. The folder's files and the defaults:
ARCHITECTURE.md.

    python -m training export
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch

from model.archs import VaeArch
from model.tiny import write_tiny_model

from .common import (
    DEMO_MODEL,
    component_archs,
    dit_from_state,
    load_state,
    read_jsonl,
    t5_state,
)
from .data import GRAMMAR_WORDS
from .ode import latest_student


def _bf16(m):
    return copy.deepcopy(m).to(torch.bfloat16)


def provenance(root: Path) -> dict:
    """Per stage: its summary.json and the last logged losses (from log.jsonl)."""
    out = {}
    for stage in ("vae", "latents", "teacher", "ode_pairs", "ode_init", "dmd", "causal_ode", "causal"):
        d = root / stage
        if not d.is_dir():
            continue
        rec = {}
        if (d / "summary.json").is_file():
            rec["summary"] = json.loads((d / "summary.json").read_text())
        log = read_jsonl(d / "log.jsonl")
        train = [r for r in log if not any(k.startswith("eval_") for k in r)]
        evals = [r for r in log if any(k.startswith("eval_") for k in r)]
        if train:
            rec["last_log"] = train[-1]
        if evals:
            rec["last_eval"] = evals[-1]
        out[stage] = rec
    return out


def _stages(choice: str, auto: tuple[str, ...]) -> tuple[str, ...]:
    """The stages to take a student from, in order of preference: all of `auto`, or just the chosen one."""
    return auto if choice == "auto" else (choice,)


def train(args) -> Path:
    root = Path(args.out)
    dest = Path(args.dest)
    vae_ck = torch.load(root / "vae" / "vae_final.pt", weights_only=True)
    vae = VaeArch(**vae_ck["arch"])
    teacher = dit_from_state(load_state(root / "teacher" / "teacher_final.pt"))
    distill_stage, distill = latest_student(root, _stages(args.distill_from, ("dmd", "ode-init")), args.distill)
    try:
        causal_stage, causal = latest_student(root, _stages(args.causal_from, ("causal", "causal-ode")), args.causal)
    except FileNotFoundError:
        if args.causal_from != "auto":
            raise
        causal_stage, causal = None, None
    if dest.exists():
        shutil.rmtree(dest)
    write_tiny_model(dest, "t2v", dit=_bf16(teacher), archs=component_archs(vae), vae_state=vae_ck["state"],
                     t5_state=t5_state(), words=GRAMMAR_WORDS, distill=_bf16(distill),
                     causal=_bf16(causal) if causal is not None else None)
    info = {"distill_from": distill_stage, "distill_weights": args.distill, "causal_from": causal_stage,
            "causal_weights": args.causal if causal is not None else None, "stages": provenance(root)}
    (dest / "TRAINING.json").write_text(json.dumps(info, indent=1))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest}: {size / 2**20:.2f} MiB")
    return dest


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dest", default=str(DEMO_MODEL))
    ap.add_argument("--distill", choices=("ema", "state"), default="ema", help="DMD generator EMA or raw weights")
    ap.add_argument("--causal", choices=("ema", "state"), default="ema")
    ap.add_argument("--distill-from", choices=("auto", "dmd", "ode-init"), default="auto",
                    help="the 4-step student's stage (auto: dmd if it ran, else ode-init)")
    ap.add_argument("--causal-from", choices=("auto", "causal", "causal-ode"), default="auto",
                    help="the causal student's stage (auto: causal if it ran, else causal-ode)")
