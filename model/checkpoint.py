"""Reading weights: files (safetensors, sharded index, .pt/.pth), key maps, strict loading, model folders.

Users point us at folders they downloaded (official Wan layout, diffusers layout, LightX2V's
distill_models/ and causvid_models/). Every failure says which file, which key, what was expected.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A weight file or folder is missing, unreadable or does not fit the model."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("generator_ema", "generator", "state_dict", "model", "module")


def _load_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e} (corrupt or truncated?)") from None


def _load_torch(path: Path) -> StateDict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable weight file"
        raise CheckpointError(f"cannot read torch file {path}: {type(e).__name__}: {e}".split("\n")[0]) from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path: Path | str = "<state dict>") -> StateDict:
    """Training checkpoints nest the weights ({"generator_ema": {...}}, {"state_dict": ...}); take them out."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:8]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_index(path: Path) -> StateDict:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a safetensors index (needs a 'weight_map'): {e}") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{path} lists shards that are missing in {path.parent}: {missing}")
    sd: StateDict = {}
    for shard in shards:
        part = _load_safetensors(path.parent / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(expected - part.keys())
        if absent:
            raise CheckpointError(f"shard {shard} lacks keys its index lists, e.g. {absent[:5]}")
        sd.update(part)
    return sd


def load_state_dict(path: str | Path) -> StateDict:
    """Load one weight file: .safetensors, *.safetensors.index.json (shards), or .pt/.pth (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weight file not found: {path}")
    name = path.name
    if name.endswith(".index.json"):
        return _load_index(path)
    if name.endswith(".safetensors"):
        return _load_safetensors(path)
    if name.endswith(TORCH_SUFFIXES):
        return _load_torch(path)
    raise CheckpointError(f"unknown weight file type: {path} (expected .safetensors, .index.json, .pt or .pth)")


def read_weights(path: str | Path) -> StateDict:
    """A weight file (as load_state_dict) or a folder of shards: its one *.safetensors.index.json, else every
    *.safetensors in it (LightX2V's converter writes block_N.safetensors / *_partN.safetensors)."""
    path = Path(path)
    if not path.is_dir():
        return load_state_dict(path)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return load_state_dict(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several safetensors indexes ({[p.name for p in indexes]}); "
                              f"pass the one to load")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no quantized weights in {path}: expected *.safetensors (LightX2V converter output)")
    sd: StateDict = {}
    for f in files:
        part = load_state_dict(f)
        dup = sorted(part.keys() & sd.keys())
        if dup:
            raise CheckpointError(f"{f} repeats keys of another shard in {path}, e.g. {dup[:3]}")
        sd.update(part)
    return sd


def find_weights(folder: Path, stems: Iterable[str]) -> Path:
    """The first existing weight file in folder among stem.{index.json, safetensors, pt, pth}.

    Raises with the list of every path looked for.
    """
    looked = []
    for stem in stems:
        for suffix in (".safetensors.index.json", ".safetensors", ".pt", ".pth"):
            p = folder / f"{stem}{suffix}"
            looked.append(str(p))
            if p.is_file():
                return p
    raise CheckpointError("no weight file found; looked for:\n  " + "\n  ".join(looked))


def save_sharded(sd: StateDict, folder: Path, stem: str, max_shard_bytes: int) -> Path:
    """Write sd as stem-0000i-of-0000n.safetensors shards + stem.safetensors.index.json (HF layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index


# --------------------------------------------------------------------------------------------------
# Strict loading with clear errors
# --------------------------------------------------------------------------------------------------
def check_state_dict(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str,
                     source: str = "") -> None:
    """Raise CheckpointError on missing keys, unexpected keys or shape mismatches (key, expected, found)."""
    src = f" from {source}" if source else ""
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:6]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:6]}")
    for k in sorted(expected.keys() & sd.keys()):
        if tuple(expected[k].shape) != tuple(sd[k].shape):
            problems.append(f"shape mismatch for {k}: expected {tuple(expected[k].shape)}, found {tuple(sd[k].shape)}")
            if len(problems) > 8:
                break
    if problems:
        raise CheckpointError(f"weights{src} do not fit the {what}:\n  " + "\n  ".join(problems))


def load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str = "") -> None:
    """Strict load; each tensor cast to the dtype of the parameter it replaces (bf16 files -> fp32 model)."""
    expected = module.state_dict()
    check_state_dict(expected, sd, what, source)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=False)


def strip_prefix(sd: StateDict, prefixes: Iterable[str]) -> StateDict:
    """Drop the first prefix that every key carries (e.g. `model.diffusion_model.`, `model.`)."""
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------------
# DiT: official <-> diffusers names
# --------------------------------------------------------------------------------------------------
# Ordered str.replace rules of diffusers' convert_wan_to_diffusers.py (order matters: norm2/norm3 swap,
# k_img keys pass two rules).
_DIT_TO_DIFFUSERS = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("attn2.to_k_img", "attn2.add_k_proj"),
    ("attn2.to_v_img", "attn2.add_v_proj"),
    ("attn2.norm_k_img", "attn2.norm_added_k"),
]


def dit_key_to_diffusers(key: str) -> str:
    for old, new in _DIT_TO_DIFFUSERS:
        key = key.replace(old, new)
    return key


def dit_keymap(official_keys: Iterable[str]) -> dict[str, str]:
    """diffusers name -> official name, for exactly the keys of our model (inverse of the rules above)."""
    out = {}
    for k in official_keys:
        d = dit_key_to_diffusers(k)
        if d in out:
            raise AssertionError(f"two official keys map to {d}")
        out[d] = k
    return out


DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "module.")


def is_diffusers_dit(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in sd)


def to_official_dit(sd: StateDict, official_keys: Iterable[str]) -> StateDict:
    """Bring a DiT state dict of any supported naming (official, diffusers, prefixed) to official names."""
    sd = strip_prefix(sd, DIT_PREFIXES)
    if not is_diffusers_dit(sd):
        return sd
    keymap = dit_keymap(official_keys)
    return {keymap.get(k, k): v for k, v in sd.items()}


def to_diffusers_dit(sd: StateDict) -> StateDict:
    return {dit_key_to_diffusers(k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------------
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
DIT_STEM = "diffusion_pytorch_model"


@dataclass(frozen=True)
class ModelFolder:
    """Where each component of a Wan2.1 model lives, for the official or the diffusers layout."""

    root: Path
    layout: str  # "official" | "diffusers"

    @classmethod
    def open(cls, root: str | Path) -> "ModelFolder":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"model folder not found: {root}")
        if (root / "model_index.json").is_file() or (root / "transformer" / "config.json").is_file():
            return cls(root, "diffusers")
        if (root / "config.json").is_file() or (root / T5_FILE).exists() or (root / VAE_FILE).exists():
            return cls(root, "official")
        raise CheckpointError(
            f"{root} is not a Wan2.1 model folder: expected config.json (official layout) or model_index.json / "
            f"transformer/config.json (diffusers layout)")

    @property
    def diffusers(self) -> bool:
        return self.layout == "diffusers"

    def dit_dir(self) -> Path:
        return self.root / "transformer" if self.diffusers else self.root

    def dit_config(self) -> dict:
        p = self.dit_dir() / "config.json"
        if not p.is_file():
            raise CheckpointError(f"DiT config not found: {p}")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p} is not valid JSON: {e}") from None

    def dit_weights(self) -> Path:
        return find_weights(self.dit_dir(), [DIT_STEM, "model"])

    def text_encoder(self) -> Path:
        if self.diffusers:
            return find_weights(self.root / "text_encoder", ["model", DIT_STEM])
        return self._file(T5_FILE)

    def tokenizer_dir(self, official_subdir: str = "google/umt5-xxl") -> Path:
        d = self.root / ("tokenizer" if self.diffusers else official_subdir)
        if not (d / "tokenizer.json").is_file():
            raise CheckpointError(f"tokenizer not found: looked for {d / 'tokenizer.json'}")
        return d

    def vae(self) -> Path:
        if self.diffusers:
            return find_weights(self.root / "vae", [DIT_STEM])
        return self._file(VAE_FILE)

    def image_encoder(self) -> Path:
        if self.diffusers:
            return find_weights(self.root / "image_encoder", ["model", DIT_STEM])
        return self._file(CLIP_FILE)

    def component_config(self, sub: str) -> dict | None:
        """config.json of a diffusers component (text_encoder, vae, image_encoder); None if absent."""
        p = self.root / sub / "config.json"
        if not (self.diffusers and p.is_file()):
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p} is not valid JSON: {e}") from None

    def _file(self, name: str) -> Path:
        p = self.root / name
        alt = p.with_suffix(".safetensors")
        if p.is_file():
            return p
        if alt.is_file():  # converted once to safetensors, key names unchanged
            return alt
        raise CheckpointError(f"missing file in {self.root}: looked for {p} and {alt}")


def convert_keys(sd: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """Apply ordered regex substitutions to every key (helper for component converters)."""
    compiled = [(re.compile(a), b) for a, b in rules]
    out = {}
    for k, v in sd.items():
        for pat, rep in compiled:
            k = pat.sub(rep, k)
        out[k] = v
    return out


Converter = Callable[[StateDict], StateDict]
