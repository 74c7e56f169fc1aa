"""The adherence metric (training/quality.py) on clips whose truth is known: the data generator's own clips.

Right clips (rendered from their prompt, through an mp4 file as generated videos are) must score 100 %;
clips rendered from other attributes must score low on exactly the attributes that differ.
"""
from __future__ import annotations

import numpy as np
import pytest

from model.video import write_mp4
from training import data
from training.quality import detect, parse_prompt, score, summarize

PROMPTS = data.eval_prompts(12, seed=7)


def _clip(prompt: str, seed: int, **override) -> np.ndarray:
    attrs = parse_prompt(prompt) | override
    return data.render(data.sample_spec(seed, **attrs))


def test_ground_truth_clips_through_mp4_score_100(tmp_path):
    results = []
    for i, p in enumerate(PROMPTS):
        path = write_mp4(tmp_path / f"{i}.mp4", _clip(p, 100 + i), fps=data.FPS)
        results.append(score(path, p))
    s = summarize(results)
    assert s["adherence"] == 1.0 and s["full"] == 1.0 and s["all4"] == 1.0, s


def test_every_prompt_of_the_grammar_is_detected_on_raw_frames():
    prompts = data.all_prompts()[::7]  # 52 prompts covering every colour, shape, direction and background
    results = [score(_clip(p, 3 + i), p) for i, p in enumerate(prompts)]
    assert summarize(results)["all4"] == 1.0


@pytest.mark.parametrize("attr", ["shape", "colour", "direction"])
def test_one_wrong_attribute_costs_exactly_one_third(attr):
    others = {"shape": data.SHAPES, "colour": data.COLOURS, "direction": data.DIRECTIONS}[attr]
    results = []
    for i, p in enumerate(PROMPTS):
        want = parse_prompt(p)
        wrong = next(v for v in others if v != want[attr] and not (attr == "colour" and v == want["background"]))
        r = score(_clip(p, 200 + i, **{attr: wrong}), p)
        assert not r["correct"][attr], (p, attr, wrong, r["detected"])
        results.append(r)
    s = summarize(results)
    assert s[attr] == 0.0 and s["full"] == 0.0
    assert abs(s["adherence"] - 2 / 3) < 1e-3, s


def test_wrong_clips_score_low(tmp_path):
    rng = np.random.default_rng(0)
    results = []
    for i, p in enumerate(PROMPTS):
        want = parse_prompt(p)
        colour = next(c for c in rng.permutation(data.COLOURS) if c not in (want["colour"], want["background"]))
        shape = next(s for s in rng.permutation(data.SHAPES) if s != want["shape"])
        direction = next(d for d in rng.permutation(data.DIRECTIONS) if d != want["direction"])
        frames = _clip(p, 300 + i, colour=str(colour), shape=str(shape), direction=str(direction))
        results.append(score(write_mp4(tmp_path / f"{i}.mp4", frames, fps=data.FPS), p))
    s = summarize(results)
    assert s["adherence"] == 0.0 and s["full"] == 0.0, s


def test_static_noise_and_blank_videos_are_not_credited():
    p = PROMPTS[0]
    static = np.repeat(_clip(p, 1)[:1], data.FRAMES, axis=0)
    assert not score(static, p)["correct"]["direction"]
    blank = np.zeros((data.FRAMES, data.HEIGHT, data.WIDTH, 3), np.uint8) + 120
    r = score(blank, p)
    assert r["adherence"] == 0.0 and detect(blank).shape is None
    noise = np.random.default_rng(1).integers(0, 256, (data.FRAMES, data.HEIGHT, data.WIDTH, 3), dtype=np.uint8)
    assert score(noise, p)["adherence"] < 1.0


def test_prompts_and_clips_are_deterministic():
    a, b = data.sample_spec(5), data.sample_spec(5)
    assert a == b and np.array_equal(data.render(a), data.render(b))
    assert data.sample_spec(6) != a
    assert len(set(data.all_prompts())) == 360
    with pytest.raises(ValueError):
        parse_prompt("a purple square moving left on a blue background")
    with pytest.raises(ValueError):
        data.sample_spec(0, colour="red", background="red")


def _blur(frames: np.ndarray, k: int = 5) -> np.ndarray:
    """Box blur (k x k) of every frame: corners get rounded the way a small VAE decoder rounds them."""
    f = np.pad(frames.astype(np.float32), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    out = sum(f[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)) / (k * k)
    return out.round().astype(np.uint8)


def test_blurred_clips_still_score_100():
    results = [score(_blur(_clip(p, 400 + i)), p) for i, p in enumerate(PROMPTS)]
    assert summarize(results)["all4"] == 1.0, [r["detected"] for r in results if not r["all4"]]
