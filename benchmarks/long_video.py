"""Long CausVid sessions of the demo model: adherence, seconds and memory per fragment; prompt switches.

Through the real pipeline (demo_model/, configs/tiny/demo_causvid_t2v.json, CPU): `--prompts` sessions of
`--fragments` fragments (training.data.eval_prompts), each fragment's decoded frames scored by
training/quality.py; then each session forked before fragment `--switch-at` (a deep copy: the same state bit for
bit) and switched to a prompt of another colour and the opposite direction, under prompt_switch "recache" and
"keep", every block after the switch scored against the new prompt. `--long N`: one session of N fragments
(seconds, cache and session bytes, process RSS). JSON on stdout, progress on stderr, `--out DIR` adds the JSON
and a PNG. The figures and how each is measured: ARCHITECTURE.md.

    python benchmarks/long_video.py [--fragments 10] [--prompts 12] [--switch-at 6] [--out out/long_video]
    python benchmarks/long_video.py --long 250 --out out/long_video
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import registry  # noqa: E402
from model.causal_pipeline import CausVidPipeline  # noqa: E402
from model.config import load_run_config  # noqa: E402
from model.video import to_uint8  # noqa: E402
from training import data  # noqa: E402
from training.quality import ATTRIBUTES, MIN_TRAVEL, detect  # noqa: E402

MODES = ("recache", "keep")  # prompt_switch
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
SEED = 100  # session i has seed SEED + i


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- scoring -------------------------------------------------------------------------------------------------

def attributes(video: torch.Tensor, per_block: bool = False) -> dict:
    """Shape, colour and direction training/quality.py detects in [3, T, H, W] frames. per_block: the direction's
    minimum travel scaled to the clip's length (the metric's 4 px are over a 17-frame clip: on a block's 4 frames
    it would call most blocks static; scaled, every block of the training clips scores right)."""
    frames = to_uint8(video)
    det = detect(frames)
    direction = det.direction
    if per_block:
        direction = None
        if det.travel is not None:
            dx, dy = det.travel
            if max(abs(dx), abs(dy)) >= MIN_TRAVEL * (len(frames) - 1) / (data.FRAMES - 1):
                direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return {"shape": det.shape, "colour": det.colour, "direction": direction, "background": det.background}


def judge(got: dict, prompt: str) -> dict:
    """training/quality.score's verdict on detected attributes: which match, adherence, all three right."""
    want = data.parse_prompt(prompt)
    correct = {k: got[k] == want[k] for k in (*ATTRIBUTES, "background")}
    return {"correct": correct, "adherence": sum(correct[k] for k in ATTRIBUTES) / len(ATTRIBUTES),
            "full": all(correct[k] for k in ATTRIBUTES)}


def switched(prompt: str) -> str:
    """The switch target: the same shape and background, another colour, the opposite direction."""
    p = data.parse_prompt(prompt)
    colours = [c for c in data.COLOURS if c not in (p["colour"], p["background"])]
    colour = colours[data.COLOURS.index(p["colour"]) % len(colours)]
    return data.make_prompt(colour, p["shape"], OPPOSITE[p["direction"]], p["background"])


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def rate(flags) -> float | None:
    flags = list(flags)
    return round(sum(bool(f) for f in flags) / len(flags), 4) if flags else None


# ---- sessions ------------------------------------------------------------------------------------------------

def load_pipelines(model: Path, config: Path) -> dict[str, CausVidPipeline]:
    """One pipeline per prompt_switch mode, sharing one model (DiT, text encoder, VAE)."""
    raw = json.loads(config.read_text())
    pipes: dict[str, CausVidPipeline] = {}
    for mode in MODES:
        cfg = load_run_config({**raw, "prompt_switch": mode}, model_cls=registry.CAUSVID.name)
        if not pipes:
            pipes[mode] = CausVidPipeline.from_pretrained(model, cfg)
        else:
            base = pipes[MODES[0]]
            pipes[mode] = CausVidPipeline(base.dit, base.text_encoder, base.vae, cfg, base.device)
    return pipes


def fork(session, pipe):
    """A deep copy of `session` (caches, decoder state, kept latents, RNG states) made by `pipe` (the same model,
    maybe another prompt_switch): the model is shared, not copied."""
    return copy.deepcopy(session, memo={id(session.pipe): pipe, id(session.pipe.vae): session.pipe.vae})


def run_fragment(session, prompt: str | None = None) -> tuple[torch.Tensor, list, dict]:
    """One next_fragment: its frames, its BlockOutputs, and its seconds and bytes."""
    blocks, nfe = [], session.nfe
    video = session.next_fragment(prompt, on_block=blocks.append)
    t = session.timings
    passes = session.nfe - nfe - len(blocks) * (len(session.pipe.sampler) + 1)  # re-cache passes
    row = {"seconds": round(t["total"], 4), "dit_s": round(t["dit"], 4), "vae_s": round(t["vae"], 4),
           "recache_s": round(t["recache"], 4) if "recache" in t else None, "recache_passes": passes,
           "blocks": len(blocks), "cache_bytes": session.cache_bytes(),
           "memory_bytes": sum(session.memory_bytes().values())}
    return video, blocks, row


def rss_bytes() -> tuple[int, str]:
    try:
        import psutil
        return psutil.Process().memory_info().rss, "psutil"
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"


def describe(pipe: CausVidPipeline, threads: int) -> dict:
    cfg = pipe.cfg
    return {"model": "demo_model (causal student)", "size": f"{cfg.target_width}x{cfg.target_height}",
            "attention_window": cfg.attention_window, "sink_frames": cfg.sink_frames,
            "block_latent_frames": cfg.num_frame_per_block, "blocks_per_fragment": cfg.num_blocks,
            "steps": len(pipe.sampler), "layers": pipe.arch.num_layers, "dim": pipe.arch.dim, "device": "cpu",
            "threads": threads, "torch": torch.__version__}


# ---- the default run: N-fragment sessions and their prompt switches ------------------------------------------

def run_sessions(pipes: dict, prompts: list[str], fragments: int, k: int, after: int, passing: float,
                 t0: float) -> dict:
    pipe = pipes[MODES[0]]
    base_rows: list[list[dict]] = []  # per prompt, per fragment
    ref_blocks: list[list[dict]] = []  # per prompt: unswitched blocks of fragments k .. k+after-1 vs their prompt
    switch: dict[str, list[dict]] = {m: [] for m in MODES}
    fork_exact = None
    for i, prompt in enumerate(prompts):
        session, rows, refs, forks = pipe.start_session(prompt, seed=SEED + i), [], [], {}
        for f in range(fragments):
            if f == k:
                forks = {m: fork(session, pipes[m]) for m in MODES}
                check = fork(session, pipe) if i == 0 else None
            video, blocks, row = run_fragment(session)
            if f == k and check is not None:  # an unswitched fork makes exactly the session's next fragment
                same, same_blocks, _ = run_fragment(check)
                fork_exact = torch.equal(same, video) and all(
                    torch.equal(a.latents, b.latents) for a, b in zip(blocks, same_blocks, strict=True))
                check.release()
            rows.append({"fragment": f + 1, **row, **judge(attributes(video), prompt)})
            if k <= f < k + after:
                refs += [judge(attributes(b.video, per_block=True), prompt) for b in blocks]
        base_rows.append(rows)
        ref_blocks.append(refs)
        new = switched(prompt)
        for m in MODES:
            s, frs, blks = forks[m], [], []
            for j in range(after):
                video, blocks, row = run_fragment(s, new if j == 0 else None)
                got = attributes(video)
                frs.append({"fragment": k + j + 1, **row, "new": judge(got, new), "old": judge(got, prompt)})
                for b in blocks:
                    got = attributes(b.video, per_block=True)
                    blks.append({"new": judge(got, new), "old": judge(got, prompt)})
            switch[m].append({"prompt": prompt, "switch_to": new, "fragments": frs, "blocks": blks,
                              "before": rows[k - 1], "unswitched": rows[k]})
            s.release()
        session.release()
        log(f"[{time.perf_counter() - t0:6.1f} s] prompt {i + 1}/{len(prompts)}: {prompt!r} -> {new!r}; adherence "
            f"by fragment {[round(r['adherence'], 2) for r in rows]}")
    out = {"sessions": summarize_sessions(base_rows), "switch": {"at_fragment": k + 1, "fragments_after": after,
                                                                   "pass_adherence": passing}}
    out["switch"]["unswitched_blocks"] = per_block(ref_blocks, lambda b: b, passing)
    for m in MODES:
        out["switch"][m] = summarize_switch(switch[m], passing)
    out["fork_exact"] = fork_exact
    return out


def summarize_sessions(base_rows: list[list[dict]]) -> dict:
    per = []
    for f in range(len(base_rows[0])):
        rows = [r[f] for r in base_rows]
        per.append({"fragment": f + 1, "adherence": mean(r["adherence"] for r in rows),
                    "full": rate(r["full"] for r in rows),
                    **{a: rate(r["correct"][a] for r in rows) for a in (*ATTRIBUTES, "background")},
                    "seconds": mean(r["seconds"] for r in rows), "dit_s": mean(r["dit_s"] for r in rows),
                    "vae_s": mean(r["vae_s"] for r in rows), "cache_bytes": max(r["cache_bytes"] for r in rows),
                    "memory_bytes": max(r["memory_bytes"] for r in rows)})
    later = [p["seconds"] for p in per[1:]] or [per[0]["seconds"]]
    return {"per_fragment": per,
            "per_prompt": [{"prompt_index": i, "adherence": [round(r["adherence"], 3) for r in rows]}
                           for i, rows in enumerate(base_rows)],
            "adherence_fragment_1": per[0]["adherence"], "adherence_last": per[-1]["adherence"],
            "adherence_all": mean(r["adherence"] for rows in base_rows for r in rows),
            "seconds_fragment_1": per[0]["seconds"], "seconds_later_mean": mean(later),
            "cache_bytes": sorted({p["cache_bytes"] for p in per}),
            "memory_bytes_first_last": [per[0]["memory_bytes"], per[-1]["memory_bytes"]]}


def per_block(sessions: list[list], pick, passing: float) -> list[dict]:
    """Per block index (1 = the first block after the switch), over the sessions."""
    out = []
    for j in range(max(len(s) for s in sessions)):
        got = [pick(s[j]) for s in sessions if j < len(s)]
        out.append({"block": j + 1, "adherence": mean(g["adherence"] for g in got),
                    "pass": rate(g["adherence"] >= passing for g in got),
                    **{a: rate(g["correct"][a] for g in got) for a in ATTRIBUTES}})
    return out


def first_block(blocks: list[dict], ok) -> int | None:
    return next((j + 1 for j, b in enumerate(blocks) if ok(b)), None)


def summarize_switch(runs: list[dict], passing: float) -> dict:
    shows = [first_block(r["blocks"], lambda b: b["new"]["adherence"] >= passing) for r in runs]
    colour = [first_block(r["blocks"], lambda b: b["new"]["correct"]["colour"]) for r in runs]
    direction = [first_block(r["blocks"], lambda b: b["new"]["correct"]["direction"]) for r in runs]
    first = [r["fragments"][0] for r in runs]
    block_dit = [(f["dit_s"] - (f["recache_s"] or 0.0)) / f["blocks"] for f in first]
    recache = [f["recache_s"] for f in first]
    shown = [s for s in shows if s is not None]
    out = {"blocks_to_show": {"per_prompt": shows, "showed": len(shown), "never": len(shows) - len(shown),
                              "median": statistics.median(shown) if shown else None, "mean": mean(shown)},
           "blocks_to_colour": {"per_prompt": colour, "median": _median(colour)},
           "blocks_to_direction": {"per_prompt": direction, "median": _median(direction)},
           "per_block_new": per_block([r["blocks"] for r in runs], lambda b: b["new"], passing),
           "per_block_old_adherence": [mean(r["blocks"][j]["old"]["adherence"] for r in runs if j < len(r["blocks"]))
                                       for j in range(max(len(r["blocks"]) for r in runs))],
           "per_fragment_after": [{"fragment": runs[0]["fragments"][j]["fragment"],
                                   "adherence_new": mean(r["fragments"][j]["new"]["adherence"] for r in runs),
                                   "full_new": rate(r["fragments"][j]["new"]["full"] for r in runs),
                                   "adherence_old": mean(r["fragments"][j]["old"]["adherence"] for r in runs),
                                   "seconds": mean(r["fragments"][j]["seconds"] for r in runs)}
                                  for j in range(len(runs[0]["fragments"]))],
           "recache_s": mean(recache), "recache_passes": max(f["recache_passes"] for f in first),
           "block_dit_s": mean(block_dit),
           "switch_fragment_s": mean(f["seconds"] for f in first),
           "unswitched_fragment_s": mean(r["unswitched"]["seconds"] for r in runs),
           "switches": [{"prompt": r["prompt"], "to": r["switch_to"]} for r in runs]}
    if out["recache_s"] is not None:
        out["recache_over_block_dit"] = round(out["recache_s"] / out["block_dit_s"], 3)
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---- --long N: one session ------------------------------------------------------------------------------------

def run_long(pipe: CausVidPipeline, prompt: str, fragments: int, warmup: int, t0: float) -> dict:
    session, rows = pipe.start_session(prompt, seed=SEED), []
    source = rss_bytes()[1]
    for f in range(fragments):
        video, _, row = run_fragment(session)
        rows.append({"fragment": f + 1, **row, "rss_bytes": rss_bytes()[0],
                     "adherence": round(judge(attributes(video), prompt)["adherence"], 3)})
        if (f + 1) % 10 == 0 or f + 1 == fragments:
            log(f"[{time.perf_counter() - t0:6.1f} s] fragment {f + 1}/{fragments}: {row['seconds']:.3f} s, "
                f"{session.latent_frames} latent frames, cache {row['cache_bytes']} B, session "
                f"{row['memory_bytes']} B, RSS {rows[-1]['rss_bytes'] >> 20} MiB")
    secs = [r["seconds"] for r in rows]
    timed = secs[warmup:]
    n = min(10, len(timed) // 2) or 1
    cache = [r["cache_bytes"] for r in rows]
    const_from = next(f + 1 for f in range(len(cache)) if len(set(cache[f:])) == 1)
    half = len(rows) // 2

    def growth(key: str) -> dict:
        mid, vals = rows[max(half - 1, 0)][key], [r[key] for r in rows[half:]]
        return {"at_middle": mid, "at_end": vals[-1], "max_second_half": max(vals),
                "growth_second_half_pct": round(100 * (vals[-1] - mid) / mid, 3),
                "max_over_middle_pct": round(100 * (max(vals) - mid) / mid, 3)}

    return {"prompt": prompt, "fragments": fragments, "latent_frames": session.latent_frames,
            "video_frames": session.frames, "warmup_fragments": warmup,
            "seconds": {"first_n_mean": mean(timed[:n]), "last_n_mean": mean(timed[-n:]), "n": n,
                        "ratio_last_first": round(statistics.fmean(timed[-n:]) / statistics.fmean(timed[:n]), 3),
                        "mean": mean(timed), "max": max(timed), "total": round(sum(secs), 2)},
            "cache_bytes": {"values": sorted(set(cache)), "constant_from_fragment": const_from},
            "memory_bytes": growth("memory_bytes"), "memory_parts_at_end": session.memory_bytes(),
            "rss_bytes": {**growth("rss_bytes"), "source": source,
                          "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
            "adherence": {"fragment_1": rows[0]["adherence"], "mean": mean(r["adherence"] for r in rows),
                          "last_10_mean": mean(r["adherence"] for r in rows[-10:])},
            "per_fragment": rows}


# ---- the plot -------------------------------------------------------------------------------------------------

def plot(path: Path, panels: list[tuple[str, dict[str, list]]]) -> dict:
    """One line chart per panel, x = 1, 2, ...: matplotlib if installed, else a plain PIL drawing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
        for ax, (title, series) in zip(axes[:, 0], panels):
            for label, ys in series.items():
                ax.plot(range(1, len(ys) + 1), ys, label=label)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return {"path": str(path), "drawn_with": "matplotlib"}
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return {"path": None, "note": "neither matplotlib nor PIL is installed: no plot"}
    w, h = 820, 230
    img = Image.new("RGB", (w, h * len(panels)), "white")
    d = ImageDraw.Draw(img)
    colours = [(56, 86, 214), (214, 70, 50), (30, 150, 70), (150, 70, 200), (120, 120, 120)]
    for i, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = 70, i * h + 26, w - 20, (i + 1) * h - 26
        vals = [v for ys in series.values() for v in ys if v is not None] or [0.0]
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1
        n = max(len(ys) for ys in series.values())
        d.rectangle([x0, y0, x1, y1], outline=(190, 190, 190))
        d.text((x0, y0 - 18), title, fill="black")
        d.text((4, y0), f"{hi:.4g}", fill="black")
        d.text((4, y1 - 10), f"{lo:.4g}", fill="black")
        d.text((x0, y1 + 4), "1", fill="black")
        d.text((x1 - 24, y1 + 4), str(n), fill="black")
        for j, (label, ys) in enumerate(series.items()):
            c = colours[j % len(colours)]
            pts = [(x0 + (x1 - x0) * t / max(n - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for t, v in enumerate(ys) if v is not None]
            if len(pts) > 1:
                d.line(pts, fill=c, width=2)
            for x, y in pts if len(pts) <= 60 else ():
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
            d.text((x1 - 230, y0 + 4 + 12 * j), label, fill=c)
    img.save(path)
    return {"path": str(path), "drawn_with": "PIL", "note": "matplotlib is not installed: drawn with PIL instead"}


def panels_default(res: dict) -> list:
    per, sw = res["sessions"]["per_fragment"], res["switch"]
    return [("adherence per fragment (unswitched sessions, mean over prompts)",
             {"adherence": [p["adherence"] for p in per], "full": [p["full"] for p in per]}),
            ("seconds per fragment (mean over prompts)",
             {"total": [p["seconds"] for p in per], "dit": [p["dit_s"] for p in per], "vae": [p["vae_s"] for p in per]}),
            (f"adherence of each block after the switch at fragment {sw['at_fragment']} (to the new prompt)",
             {**{m: [b["adherence"] for b in sw[m]["per_block_new"]] for m in MODES},
              **{f"{m}: to the old prompt": sw[m]["per_block_old_adherence"] for m in MODES},
              "unswitched, to its prompt": [b["adherence"] for b in sw["unswitched_blocks"]]})]


def panels_long(res: dict) -> list:
    rows = res["long"]["per_fragment"]
    return [("seconds per fragment", {"total": [r["seconds"] for r in rows], "dit": [r["dit_s"] for r in rows]}),
            ("adherence per fragment", {"adherence": [r["adherence"] for r in rows]}),
            ("MiB per fragment", {"session memory_bytes": [r["memory_bytes"] / 2 ** 20 for r in rows],
                                  "cache_bytes": [r["cache_bytes"] / 2 ** 20 for r in rows],
                                  "process RSS": [r["rss_bytes"] / 2 ** 20 for r in rows]})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "demo_model")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny" / "demo_causvid_t2v.json")
    ap.add_argument("--fragments", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=12, help="first P prompts of training.data.eval_prompts")
    ap.add_argument("--switch-at", type=int, help="fragment (1-based) made under the new prompt; default the middle")
    ap.add_argument("--after", type=int, help="fragments made after the switch (default: to --fragments)")
    ap.add_argument("--pass-adherence", type=float, default=1.0,
                    help="a block shows the new prompt when its adherence to it is at least this (1.0: all three)")
    ap.add_argument("--long", type=int, metavar="N", help="instead: one session of N fragments")
    ap.add_argument("--warmup", type=int, default=2, help="--long: fragments left out of the seconds ratio")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the JSON and a PNG plot here")
    args = ap.parse_args(argv)
    k = (args.switch_at or args.fragments // 2 + 1) - 1  # 0-based index of the first fragment after the switch
    if not args.long and not (1 <= k < args.fragments and args.prompts >= 1):
        ap.error(f"--switch-at must be in 2..{args.fragments} (the switch needs a fragment before it)")
    after = args.after or args.fragments - k
    if not (args.model / "causvid_models").is_dir():
        log(f"{args.model}/causvid_models not found: the demo model is made by `python -m training` "
            "(training/README.md); or pass --model")
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipes = load_pipelines(args.model, args.config)
    pipe = pipes[MODES[0]]
    prompts = data.eval_prompts(max(12, args.prompts))[:args.prompts]
    pipe.start_session(prompts[0], seed=SEED - 1).next_fragment()  # warm-up: first-call allocations, untimed
    result = {"setup": describe(pipe, args.threads)}
    if args.long:
        result["long"] = run_long(pipe, prompts[0], args.long, args.warmup, t0)
        name, panels = f"long_video_long{args.long}", panels_long
    else:
        result["setup"] |= {"fragments": args.fragments, "prompts": len(prompts), "seeds": f"{SEED}..",
                            "prompt_set": "training.data.eval_prompts"}
        result |= run_sessions(pipes, prompts, args.fragments, k, after, args.pass_adherence, t0)
        name, panels = "long_video", panels_default
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result["plot"] = plot(args.out / f"{name}.png", panels(result))
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
