"""benchmarks/long_video.py end to end on a tiny random model (grammar words, windowed CausVid config): the
quick default run (2 fragments, 1 prompt, the switch at fragment 2 under "recache" and "keep") and a short
`--long`; the JSON's shape and the figures that do not depend on the weights (the fork is exact, the re-cache
replays the visible blocks, cache bytes are flat), the JSON and PNG under --out."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import tiny_dit

from model.archs import TINY_T2V
from model.tiny import write_tiny_model
from training.data import GRAMMAR_WORDS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("long_video_cli", REPO / "benchmarks" / "long_video.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_video")
    folder = write_tiny_model(root / "model", "t2v", words=GRAMMAR_WORDS, causal=tiny_dit(TINY_T2V, seed=22))
    cfg = json.loads((REPO / "configs" / "tiny" / "causvid_t2v.json").read_text())
    cfg |= {"attention_window": 6, "sink_frames": 2, "denoising_step_list": [999, 603, 250],
            "infer_steps": 3, "fps": 16}
    (root / "cfg.json").write_text(json.dumps(cfg))
    return ["--model", str(folder), "--config", str(root / "cfg.json")]


def run(bench, capsys, argv) -> dict:
    assert bench.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_quick_run_sessions_and_switch(bench, model, capsys, tmp_path):
    out = run(bench, capsys, model + ["--fragments", "2", "--prompts", "1", "--out", str(tmp_path)])
    assert out == json.loads((tmp_path / "long_video.json").read_text())
    assert (tmp_path / "long_video.png").stat().st_size > 1000 and out["plot"]["drawn_with"] in ("matplotlib", "PIL")
    per = out["sessions"]["per_fragment"]
    assert [p["fragment"] for p in per] == [1, 2] and all(0 <= p["adherence"] <= 1 and p["seconds"] > 0 for p in per)
    assert len(out["sessions"]["cache_bytes"]) == 1 and out["fork_exact"] is True
    sw = out["switch"]
    assert sw["at_fragment"] == 2 and sw["fragments_after"] == 1 and len(sw["unswitched_blocks"]) == 3
    recache, keep = sw["recache"], sw["keep"]
    assert recache["recache_s"] > 0 and recache["recache_passes"] == 2  # the sink block + the one window block the next sees
    assert keep["recache_s"] is None and keep["recache_passes"] == 0
    for mode in (recache, keep):
        assert len(mode["per_block_new"]) == 3 and mode["block_dit_s"] > 0
        assert mode["switches"] == [{"prompt": "a red square moving left on a black background",
                                     "to": "a green square moving right on a black background"}]
        shows = mode["blocks_to_show"]
        assert shows["showed"] + shows["never"] == 1


def test_long_mode(bench, model, capsys):
    out = run(bench, capsys, model + ["--long", "6", "--warmup", "1"])["long"]
    assert out["fragments"] == 6 and out["latent_frames"] == 6 * 3 * 2 and len(out["per_fragment"]) == 6
    assert out["cache_bytes"]["constant_from_fragment"] == 1 and len(out["cache_bytes"]["values"]) == 1
    assert out["seconds"]["n"] == 2 and out["seconds"]["ratio_last_first"] > 0
    assert out["rss_bytes"]["at_end"] > 0 and out["rss_bytes"]["source"] in ("psutil", "/proc/self/statm")
    assert out["memory_bytes"]["at_middle"] > 0
