"""Synthetic training clips: one coloured shape moving in a straight line on a plain background.

Every clip comes with a prompt from a small grammar a program can check (training/quality.py),
"a {colour} {shape} moving {direction} on a {background} background": 360 prompts. A clip is fully
determined by its seed (`sample_spec(seed)` then `render(spec)`), 64x64 pixels and 17 frames (latents
5 x 8 x 8). The grammar, the size and speed ranges and why this resolution: ARCHITECTURE.md.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

FRAMES, HEIGHT, WIDTH = 17, 64, 64
FPS = 16

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 225),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows down
GRAMMAR_WORDS = ("a", "moving", "on", "background", *COLOURS, *SHAPES, *DIRECTIONS)

SIZE_RANGE = (26, 32)  # side / diameter / triangle base and height, in pixels
TRAVEL_RANGE = (18, 26)  # pixels covered over the clip
MARGIN = 2  # the shape keeps at least this far from the border

_PROMPT_RE = re.compile(r"^\s*a (\w+) (\w+) moving (\w+) on a (\w+) background\s*$")


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str
    background: str
    size: float
    x0: float  # top-left corner of the shape's bounding box in the first frame
    y0: float
    travel: float

    @property
    def prompt(self) -> str:
        return make_prompt(self.colour, self.shape, self.direction, self.background)

    def to_dict(self) -> dict:
        return asdict(self)


def make_prompt(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


def parse_prompt(prompt: str) -> dict[str, str]:
    """{'colour', 'shape', 'direction', 'background'} of a grammar prompt; ValueError otherwise."""
    m = _PROMPT_RE.match(prompt.lower())
    if not m:
        raise ValueError(f"not a grammar prompt ('a <colour> <shape> moving <direction> on a <colour> "
                         f"background'): {prompt!r}")
    colour, shape, direction, background = m.groups()
    for value, allowed, what in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"),
                                 (direction, DIRECTIONS, "direction"), (background, COLOURS, "background")):
        if value not in allowed:
            raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return {"colour": colour, "shape": shape, "direction": direction, "background": background}


def all_prompts() -> list[str]:
    """The 360 prompts of the grammar, in a fixed order."""
    return [make_prompt(c, s, d, b) for c in COLOURS for s in SHAPES for d in DIRECTIONS for b in COLOURS if b != c]


def sample_spec(seed: int, colour: str | None = None, shape: str | None = None, direction: str | None = None,
                background: str | None = None, frames: int = FRAMES, height: int = HEIGHT,
                width: int = WIDTH) -> ClipSpec:
    """A random clip (deterministic by seed); any attribute may be fixed."""
    rng = np.random.default_rng(seed)
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    direction = direction or DIRECTIONS[rng.integers(len(DIRECTIONS))]
    if background is None:
        others = [c for c in COLOURS if c != colour]
        background = others[rng.integers(len(others))]
    if background == colour:
        raise ValueError(f"the background must differ from the shape colour ({colour})")
    size = float(rng.uniform(*SIZE_RANGE))
    travel = float(rng.uniform(*TRAVEL_RANGE))
    dx, dy = DIRECTION_VECTORS[direction]

    def start(extent: int, d: int) -> float:
        lo, hi = MARGIN, extent - MARGIN - size  # range of the top-left coordinate over the whole clip
        if d == 0:
            return float(rng.uniform(lo, hi))
        if hi - lo < travel:
            raise ValueError(f"a {size:.0f}px shape cannot travel {travel:.0f}px in {extent}px")
        s = float(rng.uniform(lo, hi - travel))
        return s if d > 0 else s + travel

    return ClipSpec(colour, shape, direction, background, size, start(width, dx), start(height, dy), travel)


def _shape_mask(shape: str, size: float, x0: float, y0: float, height: int, width: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage [H, W] in [0, 1] (ss x ss supersampling)."""
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    u = (xs[None, :] - x0) / size  # shape-local coordinates in [0, 1]
    v = (ys[:, None] - y0) / size
    if shape == "square":
        m = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    elif shape == "circle":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # apex up: at height v the width is v
        m = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reshape(height, ss, width, ss).mean(axis=(1, 3))


def render(spec: ClipSpec, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of the clip."""
    dx, dy = DIRECTION_VECTORS[spec.direction]
    fg = np.array(PALETTE[spec.colour], np.float32)
    bg = np.array(PALETTE[spec.background], np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        f = i / max(frames - 1, 1)
        m = _shape_mask(spec.shape, spec.size, spec.x0 + dx * spec.travel * f, spec.y0 + dy * spec.travel * f,
                        height, width)[..., None]
        out[i] = np.round(bg * (1 - m) + fg * m).astype(np.uint8)
    return out


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1] (the VAE's input)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def clip(seed: int, **fixed) -> tuple[torch.Tensor, str, ClipSpec]:
    """(video [3, T, H, W] in [-1, 1], prompt, spec) of the clip with this seed."""
    spec = sample_spec(seed, **fixed)
    return to_tensor(render(spec)), spec.prompt, spec


def batch(seeds, **fixed) -> tuple[torch.Tensor, list[str]]:
    """[B, 3, T, H, W] videos and their prompts."""
    vids, prompts = [], []
    for s in seeds:
        v, p, _ = clip(int(s), **fixed)
        vids.append(v)
        prompts.append(p)
    return torch.stack(vids), prompts


def eval_prompts(n: int = 24, seed: int = 1234) -> list[str]:
    """A fixed, balanced prompt set: every shape and direction equally often, colours spread."""
    rng = np.random.default_rng(seed)
    combos = [(s, d) for s in SHAPES for d in DIRECTIONS]
    out = []
    for i in range(n):
        shape, direction = combos[i % len(combos)]
        colour = COLOURS[(i + i // len(combos)) % len(COLOURS)]
        others = [c for c in COLOURS if c != colour]
        background = others[int(rng.integers(len(others)))]
        out.append(make_prompt(colour, shape, direction, background))
    return out
