"""Prompt adherence of a generated clip: which shape, colour and motion the video shows, against its prompt.

Classical computer vision with numpy only, for the synthetic grammar of training/data.py: background from
the border, the largest foreground component, its colour, its shape (width ratio and corner fill, with
thresholds that allow for a VAE's rounded corners) and its direction (a line through the centroids).
`score(video, prompt)` returns the detected attributes and which are right; adherence is the mean fraction
of (shape, colour, direction) right, "full" all three. The steps and thresholds: ARCHITECTURE.md.

    python -m training.quality out/clip.mp4 "a red square moving left on a blue background"
"""
from __future__ import annotations

import argparse
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import PALETTE, parse_prompt

ATTRIBUTES = ("shape", "colour", "direction")  # what adherence scores (issue 6)
BORDER = 3
FG_THRESHOLD = 60.0
MIN_AREA = 12  # pixels; smaller masks do not count as a shape in that frame
MIN_TRAVEL = 4.0  # pixels over the clip
TRIANGLE_MAX_WIDTH_RATIO = 0.7
SQUARE_MIN_CORNER_FILL = 0.4

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[n] for n in _NAMES], np.float32)


def nearest_colour(rgb) -> str:
    d = ((_COLOURS - np.asarray(rgb, np.float32)[None]) ** 2).sum(1)
    return _NAMES[int(d.argmin())]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool [H, W] mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    queue.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return labels == best if best else np.zeros_like(mask)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


@dataclass
class Detection:
    background: str
    colour: str | None
    shape: str | None
    direction: str | None
    fill: float | None = None
    width_ratio: float | None = None
    corner_fill: float | None = None
    travel: tuple[float, float] | None = None  # (dx, dy) pixels over the clip
    frames_with_shape: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def detect(frames: np.ndarray) -> Detection:
    """frames: uint8 [T, H, W, 3]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3]; got {frames.shape}")
    f = frames.astype(np.float32)
    t = f.shape[0]
    border = np.concatenate([f[:, :BORDER].reshape(-1, 3), f[:, -BORDER:].reshape(-1, 3),
                             f[:, :, :BORDER].reshape(-1, 3), f[:, :, -BORDER:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    dist = np.sqrt(((f - bg_rgb) ** 2).sum(-1))
    fills, ratios, corners, cents, pix = [], [], [], [], []
    for i in range(t):
        m = largest_component(dist[i] > FG_THRESHOLD)
        area = int(m.sum())
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        box = m[y0:y1 + 1, x0:x1 + 1]
        bh, bw = box.shape
        fills.append(area / float(bh * bw))
        ratios.append(box[int(bh * 0.25)].mean() / max(box[min(bh - 1, int(bh * 0.75))].mean(), 1e-3))
        ch, cw = max(1, round(bh * 0.2)), max(1, round(bw * 0.2))
        corners.append(np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(),
                                box[-ch:, -cw:].mean()]))
        cents.append((i, xs.mean(), ys.mean()))
        core = _erode(m)
        pix.append(f[i][core if core.sum() >= 4 else m])
    if not cents:
        return Detection(background, None, None, None)
    colour = nearest_colour(np.median(np.concatenate(pix), axis=0))
    fill, ratio, corner = float(np.median(fills)), float(np.median(ratios)), float(np.median(corners))
    if ratio < TRIANGLE_MAX_WIDTH_RATIO:
        shape = "triangle"
    elif corner > SQUARE_MIN_CORNER_FILL:
        shape = "square"
    else:
        shape = "circle"
    direction, travel = None, None
    if len(cents) >= 2:
        c = np.array(cents, np.float64)
        tt = c[:, 0] - c[:, 0].mean()
        denom = float((tt ** 2).sum())
        dx = float((tt * (c[:, 1] - c[:, 1].mean())).sum() / denom) * (t - 1)
        dy = float((tt * (c[:, 2] - c[:, 2].mean())).sum() / denom) * (t - 1)
        travel = (round(dx, 2), round(dy, 2))
        if max(abs(dx), abs(dy)) >= MIN_TRAVEL:
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
    return Detection(background, colour, shape, direction, round(fill, 3), round(ratio, 3), round(corner, 3), travel,
                     len(cents))


def to_frames(video) -> np.ndarray:
    """An mp4 path, uint8 [T, H, W, 3] frames or a [3, T, H, W] tensor in [-1, 1] -> uint8 frames."""
    if isinstance(video, (str, Path)):
        from model.video import read_mp4
        return read_mp4(video)[0]
    if isinstance(video, np.ndarray):
        return video
    from model.video import to_uint8
    return to_uint8(video)


def score(video, prompt: str) -> dict:
    """Detected attributes of one clip, which of them match the prompt, and its adherence."""
    want = parse_prompt(prompt)
    det = detect(to_frames(video))
    got = {"shape": det.shape, "colour": det.colour, "direction": det.direction, "background": det.background}
    correct = {k: got[k] == want[k] for k in (*ATTRIBUTES, "background")}
    return {"prompt": prompt, "detected": det.to_dict(), "correct": correct,
            "adherence": sum(correct[k] for k in ATTRIBUTES) / len(ATTRIBUTES),
            "full": all(correct[k] for k in ATTRIBUTES),
            "all4": all(correct.values())}


def summarize(results: list[dict]) -> dict:
    """Adherence (mean fraction of shape/colour/direction right), full-correct rate and per-attribute accuracy."""
    n = len(results)
    if not n:
        return {"n": 0}
    out = {"n": n,
           "adherence": round(sum(r["adherence"] for r in results) / n, 4),
           "full": round(sum(r["full"] for r in results) / n, 4),
           "all4": round(sum(r["all4"] for r in results) / n, 4)}
    for k in (*ATTRIBUTES, "background"):
        out[k] = round(sum(r["correct"][k] for r in results) / n, 4)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Score one mp4 against its grammar prompt (prints JSON).")
    ap.add_argument("video")
    ap.add_argument("prompt")
    args = ap.parse_args(argv)
    print(json.dumps(score(args.video, args.prompt)))


if __name__ == "__main__":
    main()
