"""Checking a CausVid session state before a restore (model/causal_session.py): kept apart so the session
module stays readable top to bottom."""
from __future__ import annotations

from typing import Any

import torch

from .pipeline import check_prompt

STATE_FORMAT = "wanserve.causvid.session/2"


def check_state(pipe, state: Any) -> tuple[int, int, int]:
    """Everything `restore` can refuse, checked before it does any work (a ValueError saying why).

    Returns the state's (seed, height, width). A parallel group checks on every rank before the collective
    replay, so a bad state is refused everywhere alike and the group stays usable."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a CausVid session state (format {STATE_FORMAT!r} expected)")
    missing = sorted({"config", "seed", "height", "width", "prompt", "prompts", "ops", "blocks", "pos", "recache",
                      "fragments", "partial", "latents", "decoder_blocks", "noise_rng", "step_rng"} - set(state))
    if missing:
        raise ValueError(f"session state lacks {', '.join(missing)}")
    want = pipe.state_config()
    diff = sorted(k for k in set(want) | set(state["config"]) if want.get(k) != state["config"].get(k))
    if diff:
        raise ValueError(f"session state was made with other settings ({', '.join(diff)}) than this pipeline's; "
                         "it cannot be reproduced here")
    seed, height, width = pipe.check_request(int(state["seed"]), int(state["height"]), int(state["width"]))
    check_prompt(state["prompt"], pipe.cfg.max_prompt_chars)
    shape = (pipe.arch.out_dim, pipe.cfg.num_frame_per_block, height // 8, width // 8)
    lat, blocks = state["latents"], int(state["blocks"])
    if not isinstance(lat, dict) or any(not isinstance(t, torch.Tensor) or tuple(t.shape) != shape
                                        or not 0 <= b < blocks for b, t in lat.items()):
        raise ValueError(f"session state latents do not match its {blocks} blocks at {height}x{width}: "
                         f"one {shape} tensor per kept block expected")
    for b, frame, p in state["ops"]:
        if b not in lat or not 0 <= p < len(state["prompts"]) or frame < 0:
            raise ValueError("session state: a cached block has no latents, or refers to a prompt it does not "
                             "list")
    tail = range(max(0, blocks - int(state["decoder_blocks"])), blocks)
    if any(b not in lat for b in tail):
        raise ValueError("session state lacks the latest blocks' latents its decoder needs")
    primed = state.get("primed")  # absent: a state from before batched re-caches (none ran)
    if primed is not None:
        if not (isinstance(primed, (list, tuple)) and len(primed) == 2):
            raise ValueError("session state: 'primed' must be a [first, end) pair of cache frames or None")
        bf = pipe.cfg.num_frame_per_block
        inside = [(frame, p) for _, frame, p in state["ops"] if primed[0] <= frame < primed[1]]
        if [f for f, _ in inside] != list(range(primed[0], primed[1], bf)) or len({p for _, p in inside}) != 1:
            raise ValueError("session state: its batched re-cache does not match its cached blocks")
    return seed, height, width
