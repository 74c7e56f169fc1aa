"""CausVid sessions: 10 fragments in one session — time per fragment, cache bytes, time to first block.

Two sessions of a small-but-real CausVid setup: "window" (a 21-frame attention window with a sink, so
fragment 10 should cost what fragment 2 costs: `ratio_10_2`, goal <= 1.10) and "no_window" (the growing
cache the window is for). Fastest of `--repeats` runs per fragment, one thread by default; prints one JSON
object. The setup in full: ARCHITECTURE.md.

    python benchmarks/causvid_fragments.py [--fragments 10] [--repeats 1] [--threads 1]
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
from model.causal_pipeline import CausVidPipeline  # noqa: E402
from model.config import load_run_config  # noqa: E402
from model.dit import WanModel  # noqa: E402
from model.tiny import write_tiny_model  # noqa: E402

# A mid-size DiT over few tokens: the tiny VAE's CPU conv3d cost grows with pixels, the DiT's with tokens.
ARCH = DiTArch(model_type="t2v", in_dim=4, out_dim=4, dim=384, ffn_dim=1536, freq_dim=256, text_dim=32,
               text_len=32, num_heads=6, num_layers=6)
HEIGHT, WIDTH = 64, 96  # -> 8x12 latents -> 24 tokens per latent frame, 72 per block
CONFIG = {"target_video_length": 81, "target_height": HEIGHT, "target_width": WIDTH, "text_len": ARCH.text_len,
          "sample_shift": 8, "enable_cfg": False, "num_frames": 21, "num_frame_per_block": 3, "num_blocks": 7,
          "frame_seq_length": (HEIGHT // 16) * (WIDTH // 16),
          "denoising_step_list": [999, 934, 862, 756, 603, 410, 250, 140, 74]}
PROMPT = "a red square moving left on a blue background"


def run_session(pipe: CausVidPipeline, fragments: int) -> list[dict]:
    session = pipe.start_session(PROMPT, seed=0)
    rows = []
    for k in range(fragments):
        session.next_fragment()
        t = session.timings
        rows.append({"fragment": k + 1, "seconds": t["total"], "dit_s": t["dit"], "vae_s": t["vae"],
                     "first_block_s": t["first_block"], "cache_bytes": session.cache_bytes(),
                     "keys_per_query": session.cache.held * session.cache.layers[0].frame_tokens})
    rows[-1]["memory_bytes"] = session.memory_bytes()
    return rows


def best_of(pipe: CausVidPipeline, fragments: int, repeats: int) -> dict:
    runs = [run_session(pipe, fragments) for _ in range(repeats)]
    rows = []
    for k in range(fragments):
        fastest = min((r[k] for r in runs), key=lambda row: row["seconds"])
        rows.append({key: (round(v, 4) if isinstance(v, float) else v) for key, v in fastest.items()})
    out = {"fragments": rows}
    if fragments >= 10:
        out["ratio_10_2"] = round(rows[9]["seconds"] / rows[1]["seconds"], 3)
        out["dit_ratio_10_2"] = round(rows[9]["dit_s"] / rows[1]["dit_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fragments", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="runs of the windowed session (fastest counts)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dit = WanModel(ARCH).init_weights()
        with torch.no_grad():  # init_weights zeroes the head; give the flow a visible scale
            torch.nn.init.normal_(dit.head.head.weight, std=0.02)
        root = write_tiny_model(Path(tmp) / "model", "t2v", dit=dit, causal=dit, words=PROMPT.split())
        cfg = load_run_config(CONFIG, model_cls=registry.CAUSVID.name)
        windowed = load_run_config({**CONFIG, "attention_window": 21, "sink_frames": 3},
                                   model_cls=registry.CAUSVID.name)
        base = CausVidPipeline.from_pretrained(root, cfg)
        win = CausVidPipeline(base.dit, base.text_encoder, base.vae, windowed, base.device)
        win.start_session(PROMPT, seed=1).next_fragment()  # warm up: first-call allocations out of the timing
        result = {
            "model": {"dim": ARCH.dim, "layers": ARCH.num_layers, "heads": ARCH.num_heads, "size": f"{HEIGHT}x{WIDTH}",
                      "tokens_per_frame": CONFIG["frame_seq_length"], "block_frames": 3, "blocks_per_fragment": 7,
                      "steps": len(base.sampler), "dit_forwards_per_fragment": 7 * (len(base.sampler) + 1),
                      "threads": args.threads},
            "window": {"attention_window": 21, "sink_frames": 3, **best_of(win, args.fragments, args.repeats)},
            "no_window": best_of(base, args.fragments, 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
