"""LoRA files merged into the DiT's weights on load: W += strength * scale * (B @ A).

Merged rather than run as a low-rank branch: a merged linear costs nothing per step, works unchanged with
sequence parallelism and the CausVid cache, and can be quantized afterwards (a merge cannot be undone in
place: load the base weights again). Reads the kohya / PEFT / diffusers / LightX2V layouts under any naming;
strict: every key lands on a weight of the right shape or the merge fails naming file and key, and all
files are checked before the first weight changes. The key grammar: ARCHITECTURE.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, MutableMapping, Sequence, Union

import torch

from .checkpoint import CheckpointError, dit_key_to_diffusers, dit_keymap, load_state_dict
from .config import LoraConfig
from .paths import resolve_under

LoraSource = Union[Mapping[str, torch.Tensor], str, Path]
LoraSpec = Union[LoraConfig, tuple[LoraSource, float]]


class LoraError(ValueError):
    """A LoRA file does not fit the model (unknown key, rank or shape mismatch, missing partner)."""


# --------------------------------------------------------------------------------------------------
# Key grammar
# --------------------------------------------------------------------------------------------------
# (suffix, role). Roles: up = B, down = A, alpha, and full deltas for .weight / .bias / .modulation.
# No key can end with two of these suffixes, so the order of the checks does not matter.
_SUFFIXES: list[tuple[str, str]] = [
    (".lora_up.weight", "up"), (".lora_down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B", "up"), (".lora_A", "down"),
    (".alpha", "alpha"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".diff_m", "diff_m"),
]
# What each role changes: the parameter name that follows the module path.
_TARGET_PARAM = {"up": "weight", "down": "weight", "diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
_PARTNER = {"up": "down", "down": "up"}

# Stripped from the front of a key, repeatedly (a PEFT wrapper around a ComfyUI name has two).
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.",
             "unet.", "module.")
_KOHYA_PREFIX = "lora_unet_"
_UNSUPPORTED = ("lokr_", "hada_", "lora_mid", ".oft_", "dora_scale")


def _split_key(key: str) -> tuple[str, str] | None:
    """(module base, role) of one file key, or None when it is not a LoRA key we know."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


class _Names:
    """Resolves a module path of a LoRA file + parameter name to one official key of the model."""

    def __init__(self, model_keys: Iterable[str]):
        self.official = set(model_keys)
        self.diffusers = dit_keymap(self.official)  # diffusers name -> official name
        # kohya flattening (dots -> underscores) of both namings; a collision makes the name ambiguous.
        self.flat: dict[tuple[str, str], str | None] = {}
        for key in self.official:
            for name in {key, dit_key_to_diffusers(key)}:
                module, _, param = name.rpartition(".")
                flat = (module.replace(".", "_"), param)
                self.flat[flat] = key if self.flat.get(flat, key) == key else None

    def resolve(self, base: str, param: str) -> str | None:
        if base.startswith(_KOHYA_PREFIX):
            flat = base[len(_KOHYA_PREFIX):].lstrip("_").replace(".", "_")
            return self.flat.get((flat, param))
        name = f"{_strip_prefixes(base)}.{param}"
        if name in self.official:
            return name
        return self.diffusers.get(name)


# --------------------------------------------------------------------------------------------------
# Parsing one file
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraDelta:
    """Everything one LoRA file adds to one weight of the model: a low-rank pair and/or a full delta."""

    target: str
    up: torch.Tensor | None = None     # B [out, r] (or [out, r, 1, 1, 1] for a conv)
    down: torch.Tensor | None = None   # A [r, in]  (or [r, in, kt, kh, kw])
    alpha: float | None = None
    diff: torch.Tensor | None = None   # full delta, same shape as the target
    keys: list[str] = field(default_factory=list)  # the file keys it came from, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0] if self.down is not None else 0

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without alpha (alpha 0 means 'unset' to kohya and LightX2V)."""
        return self.alpha / self.rank if self.alpha else 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the delta, known without computing it."""
        if self.up is not None:
            return (self.up.shape[0], *self.down.shape[1:])
        return tuple(self.diff.shape)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale * B @ A (+ diff), computed in float32 on `device`."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=device)
        if self.up is not None:
            up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
            out += (up.flatten(1) @ down.flatten(1)).reshape(self.shape) * self.scale
        if self.diff is not None:
            out += self.diff.to(device, torch.float32)
        return out


def parse_lora(sd: Mapping[str, torch.Tensor], model_keys: Iterable[str],
               source: str = "<state dict>") -> dict[str, LoraDelta]:
    """Group the keys of one LoRA file by the model weight they change: {official key: LoraDelta}.

    model_keys: the model's state-dict keys (official names); they resolve diffusers and kohya names and
    every key that fits none of them is an error. Shapes are checked against the model by `check_fits`.
    """
    names = _Names(model_keys)
    grouped: dict[str, dict[str, str]] = {}  # file base -> role -> file key
    for key in sd:
        split = _split_key(key)
        if split is None:
            hint = " (LyCORIS/DoRA/LoCon-mid formats are not supported)" if any(u in key for u in _UNSUPPORTED) else ""
            raise LoraError(f"LoRA {source}: key {key!r} is not a LoRA weight we know{hint}; expected "
                            f"X.lora_up.weight/X.lora_down.weight, X.lora_B.weight/X.lora_A.weight, X.alpha, "
                            f"X.diff, X.diff_b or X.diff_m")
        base, role = split
        grouped.setdefault(base, {})[role] = key

    out: dict[str, LoraDelta] = {}
    for base, roles in grouped.items():
        for role, partner in _PARTNER.items():
            if role in roles and partner not in roles:
                raise LoraError(f"LoRA {source}: {roles[role]!r} has no lora_{partner} partner for {base!r}")
        if "alpha" in roles and "up" not in roles:
            raise LoraError(f"LoRA {source}: {roles['alpha']!r} has no lora_up/lora_down pair for {base!r}")

        for role, key in roles.items():
            if role in ("down", "alpha"):
                continue  # handled with "up"
            target = names.resolve(base, _TARGET_PARAM[role])
            if target is None:
                raise LoraError(f"LoRA {source}: key {key!r} matches no weight of the model "
                                f"(looked for {base!r} + '.{_TARGET_PARAM[role]}' under official, diffusers "
                                f"and kohya names)")
            entry = out.setdefault(target, LoraDelta(target))
            if role == "up":
                if entry.up is not None:
                    raise LoraError(f"LoRA {source}: {key!r} and {entry.keys[0]!r} both change {target}")
                entry.up, entry.down = sd[key], sd[roles["down"]]
                entry.alpha = _alpha(sd, roles.get("alpha"), source)
                entry.keys[:0] = [key, roles["down"]]
                _check_rank(entry, source)
            else:
                if entry.diff is not None:
                    raise LoraError(f"LoRA {source}: {key!r} and {entry.keys[-1]!r} both change {target}")
                entry.diff = sd[key]
                entry.keys.append(key)
    if not out:
        raise LoraError(f"LoRA {source}: no LoRA weights found")
    return out


def _alpha(sd: Mapping[str, torch.Tensor], key: str | None, source: str) -> float | None:
    if key is None:
        return None
    t = sd[key]
    if t.numel() != 1:
        raise LoraError(f"LoRA {source}: {key!r} should be a scalar, found shape {tuple(t.shape)}")
    return float(t.item())


def _check_rank(d: LoraDelta, source: str) -> None:
    up, down = d.up, d.down
    ok = (up.dim() >= 2 and down.dim() >= 2 and up.dim() == down.dim() and up.shape[1] == down.shape[0]
          and all(s == 1 for s in up.shape[2:]))
    if not ok:
        raise LoraError(f"LoRA {source}: rank mismatch for {d.keys[0]!r}: lora_up/B has shape {tuple(up.shape)} "
                        f"and lora_down/A has shape {tuple(down.shape)} (need B [out, r] and A [r, in])")


def check_fits(deltas: Mapping[str, LoraDelta], params: Mapping[str, torch.Tensor], source: str) -> None:
    """Every delta has the shape of the weight it changes."""
    for target, d in deltas.items():
        expected = tuple(params[target].shape)
        if d.up is not None and d.shape != expected:
            raise LoraError(f"LoRA {source}: {d.keys[0]!r}: B @ A does not fit {target}: expected shape "
                            f"{expected}, found {d.shape}")
        if d.diff is not None and tuple(d.diff.shape) != expected:
            raise LoraError(f"LoRA {source}: {d.keys[-1]!r}: shape mismatch for {target}: expected {expected}, "
                            f"found {tuple(d.diff.shape)}")


# --------------------------------------------------------------------------------------------------
# Merging into a model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergedLora:
    name: str
    strength: float
    targets: tuple[str, ...]  # official keys changed

    @property
    def layers(self) -> int:
        """Modules touched (a weight and its bias count once)."""
        return len({t.rpartition(".")[0] for t in self.targets})


@dataclass(frozen=True)
class LoraReport:
    loras: tuple[MergedLora, ...]

    def __str__(self) -> str:
        return "; ".join(f"LoRA {m.name} (strength {m.strength:g}): {len(m.targets)} weights in {m.layers} layers"
                         for m in self.loras) or "no LoRA"


def _read(spec: LoraSpec, index: int, roots: Sequence[str | Path] | None) -> tuple[str, Mapping, float]:
    """(name for messages, state dict, strength) of one LoRA; paths are opened only under roots."""
    if isinstance(spec, LoraConfig):
        src, strength, name = spec.path, spec.strength, spec.name
    else:
        src, strength = spec
        name = None
    strength = float(strength)
    if isinstance(src, Mapping):
        name = name or f"<state dict #{index}>"
        sd = src
    else:
        name = name or str(src)
        path = resolve_under(src, roots or [], "LoRA")  # PathNotAllowed / FileNotFoundError pass through
        try:
            sd = load_state_dict(path)
        except CheckpointError as e:
            raise LoraError(f"LoRA {name}: {e}") from None
    if not math.isfinite(strength):
        raise LoraError(f"LoRA {name}: strength must be a finite number, got {strength}")
    return name, sd, strength


@torch.no_grad()
def merge_lora_weights(weights: MutableMapping[str, torch.Tensor], loras: Sequence[LoraSpec],
                       roots: Sequence[str | Path] | None = None) -> LoraReport:
    """Merge LoRAs into a name -> tensor mapping in order: W += strength * scale * B @ A, bias += strength *
    diff_b. Each changed entry is replaced by a new tensor of its dtype and device.

    loras: LoraConfig items, or (state dict | path, strength) pairs. Paths are opened only through
    `resolve_under(path, roots, "LoRA")`. Deltas are computed in float32 on the weight's device and the sum
    cast back to the weight's dtype. All files are read and checked first; nothing changes on error.
    """
    parsed = []
    for i, spec in enumerate(loras):
        name, sd, strength = _read(spec, i, roots)
        deltas = parse_lora(sd, weights.keys(), name)
        check_fits(deltas, weights, name)
        for target in deltas:
            if not weights[target].is_floating_point() or weights[target].element_size() < 2:
                raise LoraError(f"LoRA {name}: {target} is {weights[target].dtype} (quantized?): merge LoRAs into "
                                "float weights, then quantize")
        parsed.append((name, strength, deltas))

    merged = []
    for name, strength, deltas in parsed:
        for target, d in deltas.items():
            w = weights[target]
            weights[target] = (w.float() + d.delta(w.device) * strength).to(w.dtype)
        merged.append(MergedLora(name, strength, tuple(sorted(deltas))))
    return LoraReport(tuple(merged))


@torch.no_grad()
def merge_loras(model: torch.nn.Module, loras: Sequence[LoraSpec],
                roots: Sequence[str | Path] | None = None) -> LoraReport:
    """merge_lora_weights into a module's parameters, in place (see there)."""
    params = model.state_dict(keep_vars=True)
    weights = dict(params)
    report = merge_lora_weights(weights, loras, roots)
    for k, v in weights.items():
        if v is not params[k]:
            params[k].copy_(v)
    return report
