"""Prompt adherence and wall time of the demo model's generators over a fixed prompt set; prints JSON.

    python benchmarks/quality.py [--model demo_model] [--n 24] [--threads 1]

The teacher, the 4-step student and the causal student each generate every prompt of
`training.data.eval_prompts(n)` through the real pipeline on the shipped weights; each mp4 is read back and
scored by training/quality.py. Wall times are whole generate() calls after a warm-up; the teacher/distill
speed ratio comes from separate interleaved rounds. How each number is measured: ARCHITECTURE.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import data
from training.demo import CONFIGS, generate, load_pipeline, skipped
from training.quality import score, summarize

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"teacher_min": 0.80, "distill_within": 0.10, "causal_within": 0.15, "e2e_speedup_min": 15.0,
           "tiny_e2e_speedup_min": 20.0, "tiny_decode_speedup_min": 10.0, "tiny_psnr_min_db": 28.0,
           "tiny_adherence_within": 0.03}
TAE = "taew2_1_demo.pth"  # the demo model's tiny decoder (training/tae.py), inside the model folder


def tiny_pipeline(model: Path):
    """The 4-step student decoding with the tiny decoder (use_tae), or None when the model folder has none."""
    if not (model / TAE).is_file():
        return None
    from model.config import load_run_config
    model_cls, config = CONFIGS["distill"]
    cfg = load_run_config(ROOT / config, model_cls=model_cls, task="t2v", tae_path=TAE, use_tae=True)
    return cfg.model_class.pipeline_class().from_pretrained(model, cfg)


def decoder_rounds(pipe, prompts: list[str]) -> dict:
    """The two decoders on the same latents (the student's, one per prompt): seconds (the fastest of 5 calls
    each per clip, interleaved, 1 thread: this box is shared) and the PSNR of the tiny decode against the full."""
    from training.tae import psnr
    full, tiny, db = [], [], []
    for i, prompt in enumerate(prompts):
        lat = pipe.generate(prompt, seed=3000 + i).latents[None]
        for _ in range(5):
            t0 = time.perf_counter()
            ref = pipe.decode(lat, "full")
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = pipe.decode(lat, "tiny")
            tiny.append(time.perf_counter() - t0)
        db.append(psnr(got, ref))
    return {"full_decode_s": round(min(full), 5), "tiny_decode_s": round(min(tiny), 5),
            "decode_speedup": round(min(full) / min(tiny), 2), "psnr_db_mean": round(statistics.mean(db), 2),
            "psnr_db_min": round(min(db), 2), "clips": len(prompts)}


def run_variant(pipe, variant: str, prompts: list[str], out: Path) -> dict:
    generate(pipe, variant, prompts[0], 999)  # warm-up, untimed
    results, seconds, dit = [], [], []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        gen = generate(pipe, variant, prompt, 1000 + i)
        seconds.append(time.perf_counter() - t0)
        dit.append(gen.timings.get("dit", float("nan")))
        path = gen.save(out / f"{variant}_{i:02d}.mp4")
        results.append(score(path, prompt))
        nfe = gen.nfe
    return {**summarize(results), "nfe_per_video": nfe,
            "seconds": {"mean": round(statistics.mean(seconds), 4), "median": round(statistics.median(seconds), 4),
                        "min": round(min(seconds), 4), "total": round(sum(seconds), 2),
                        "dit_mean": round(statistics.mean(dit), 4)},
            "per_prompt": [{"prompt": r["prompt"], "correct": r["correct"], "detected": {
                k: r["detected"][k] for k in ("shape", "colour", "direction", "background")}} for r in results]}


def speed_rounds(teacher, distill, rounds: int, tiny=None) -> dict:
    t, d, dt = [], [], []
    for r in range(rounds):
        p = data.eval_prompts(rounds)[r]
        t0 = time.perf_counter()
        generate(teacher, "teacher", p, 2000 + r)
        t.append(time.perf_counter() - t0)
        for k in range(3):
            t0 = time.perf_counter()
            generate(distill, "distill", p, 2000 + r)
            d.append(time.perf_counter() - t0)
            if tiny is not None:
                t0 = time.perf_counter()
                generate(tiny, "distill", p, 2000 + r)
                dt.append(time.perf_counter() - t0)
    tm, dm = statistics.median(t), statistics.median(d)
    out = {"teacher_min_s": round(min(t), 4), "distill_min_s": round(min(d), 4),
           "e2e_speedup": round(min(t) / min(d), 2), "rounds": rounds,
           "teacher_median_s": round(tm, 4), "distill_median_s": round(dm, 4), "e2e_speedup_median": round(tm / dm, 2)}
    if dt:  # the same student, its frames from the tiny decoder
        out.update({"distill_tiny_min_s": round(min(dt), 4), "e2e_speedup_tiny": round(min(t) / min(dt), 2),
                    "e2e_speedup_tiny_median": round(tm / statistics.median(dt), 2)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "demo_model"))
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--skip", action="append", default=[], choices=sorted([*CONFIGS, "tiny"]))
    ap.add_argument("--out", default=None, help="keep the mp4s here (default: a temporary directory)")
    ap.add_argument("--per-prompt", action="store_true", help="include every clip's detection in the JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    prompts = data.eval_prompts(args.n)
    report: dict = {"model": str(model), "prompts": args.n, "threads": args.threads,
                    "device": "cpu", "attributes": ["shape", "colour", "direction"]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        pipes = {}
        for variant in CONFIGS:
            if variant in args.skip or skipped(variant, model):
                continue
            pipes[variant] = load_pipeline(variant, model)
            res = run_variant(pipes[variant], variant, prompts, out)
            if not args.per_prompt:
                res.pop("per_prompt")
            report[variant] = res
            print(f"{variant}: adherence {res['adherence']:.3f} full {res['full']:.3f} "
                  f"{res['seconds']['median']:.3f} s/video", file=sys.stderr, flush=True)
        tiny = tiny_pipeline(model) if "distill" in pipes and "tiny" not in args.skip else None
        if tiny is not None:  # the student through the tiny decoder: adherence, decode speed and PSNR
            res = run_variant(tiny, "distill", prompts, out / "tiny")
            if not args.per_prompt:
                res.pop("per_prompt")
            report["distill_tiny"] = res
            report["tiny_decoder"] = decoder_rounds(tiny, prompts[:8])
        if "teacher" in pipes and "distill" in pipes:
            report["speed"] = speed_rounds(pipes["teacher"], pipes["distill"], args.speed_rounds, tiny)
            report["speed"]["e2e_speedup_median_of_adherence_pass"] = round(
                report["teacher"]["seconds"]["median"] / report["distill"]["seconds"]["median"], 2)
    if "teacher" in report:
        t = report["teacher"]["adherence"]
        acc = {"teacher_adherence_ge_0.80": t >= TARGETS["teacher_min"]}
        if "distill" in report:
            acc["distill_within_10_points"] = report["distill"]["adherence"] >= t - TARGETS["distill_within"]
        if "causal" in report:
            acc["causal_within_15_points"] = report["causal"]["adherence"] >= t - TARGETS["causal_within"]
        if "speed" in report:
            acc["distill_e2e_speedup_ge_15x"] = report["speed"]["e2e_speedup"] >= TARGETS["e2e_speedup_min"]
        if "distill_tiny" in report and "distill" in report:
            td = report["tiny_decoder"]
            acc["tiny_adherence_within_0.03"] = (abs(report["distill_tiny"]["adherence"] - report["distill"]["adherence"])
                                                 <= TARGETS["tiny_adherence_within"])
            acc["tiny_decode_ge_10x_faster"] = td["decode_speedup"] >= TARGETS["tiny_decode_speedup_min"]
            acc["tiny_psnr_ge_28db"] = td["psnr_db_mean"] >= TARGETS["tiny_psnr_min_db"]
            if "e2e_speedup_tiny" in report.get("speed", {}):
                acc["distill_tiny_e2e_speedup_ge_20x"] = report["speed"]["e2e_speedup_tiny"] >= TARGETS["tiny_e2e_speedup_min"]
        report["acceptance"] = acc
    print(json.dumps(report))


if __name__ == "__main__":
    main()
