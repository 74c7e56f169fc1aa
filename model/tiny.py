"""Tiny Wan2.1 model folders: the release's classes and official file layout, with small numbers.

Nothing can be downloaded here, so tests, benchmarks and the demo write their own model folders. The files
are the official ones (config.json + DiT safetensors, umT5 and CLIP `.pth` with Wan's key names,
`Wan2.1_VAE.pth`, `google/umt5-xxl/tokenizer.json`) plus `wanserve.json` naming the small architectures, so
the same loaders that read a real Wan2.1-T2V-14B folder read these.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from . import registry
from .archs import TINY_I2V, TINY_T2V, ClipArch, ComponentArchs, DiTArch, T5Arch, VaeArch
from .checkpoint import CLIP_FILE, T5_FILE, VAE_FILE
from .dit import WanModel
from .vae import vae_config, vae_key

SPECIAL_WORDS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
TINY_T5 = T5Arch(vocab_size=64, dim=32, dim_attn=32, ffn_dim=48, num_heads=4, num_layers=2)
TINY_CLIP = ClipArch(image_size=28, patch_size=14, width=32, num_layers=3, num_heads=4)
TINY_VAE = VaeArch(base_dim=8, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


def t5_official_shapes(a: T5Arch) -> dict[str, tuple]:
    """Key -> shape of Wan's `models_t5_umt5-xxl-enc-bf16.pth` for architecture a."""
    s = {"token_embedding.weight": (a.vocab_size, a.dim)}
    for i in range(a.num_layers):
        p = f"blocks.{i}."
        s |= {p + "norm1.weight": (a.dim,), p + "norm2.weight": (a.dim,),
              p + "attn.q.weight": (a.dim_attn, a.dim), p + "attn.k.weight": (a.dim_attn, a.dim),
              p + "attn.v.weight": (a.dim_attn, a.dim), p + "attn.o.weight": (a.dim, a.dim_attn),
              p + "ffn.gate.0.weight": (a.ffn_dim, a.dim), p + "ffn.fc1.weight": (a.ffn_dim, a.dim),
              p + "ffn.fc2.weight": (a.dim, a.ffn_dim),
              p + "pos_embedding.embedding.weight": (a.num_buckets, a.num_heads)}
    return s | {"norm.weight": (a.dim,)}


def clip_official_shapes(a: ClipArch, textual: bool = True) -> dict[str, tuple]:
    """Key -> shape of Wan's open-clip `.pth` (visual tower; `textual` adds a few text-tower keys)."""
    w, m, n = a.width, int(a.width * a.mlp_ratio), (a.image_size // a.patch_size) ** 2 + 1
    s = {"visual.cls_embedding": (1, 1, w), "visual.pos_embedding": (1, n, w),
         "visual.patch_embedding.weight": (w, 3, a.patch_size, a.patch_size),
         "visual.pre_norm.weight": (w,), "visual.pre_norm.bias": (w,)}
    for i in range(a.num_layers):
        p = f"visual.transformer.{i}."
        s |= {p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "norm2.weight": (w,), p + "norm2.bias": (w,),
              p + "attn.to_qkv.weight": (3 * w, w), p + "attn.to_qkv.bias": (3 * w,),
              p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
              p + "mlp.0.weight": (m, w), p + "mlp.0.bias": (m,), p + "mlp.2.weight": (w, m), p + "mlp.2.bias": (w,)}
    s |= {"visual.post_norm.weight": (w,), "visual.post_norm.bias": (w,), "visual.head": (w, 1024), "log_scale": ()}
    if textual:  # a few keys of the XLM-R text tower, which Wan never uses
        s |= {"textual.token_embedding.weight": (250002, 1024), "textual.pos_embedding.weight": (514, 1024),
              "textual.blocks.0.attn.q.weight": (1024, 1024), "textual.head.0.weight": (1024, 1024)}
    return s


def random_weights(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of sensible scale: norms near 1, fan-in scaled matrices, small embeddings and biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g)
        if "norm" in k and k.endswith("weight"):
            out[k] = 1 + 0.1 * t
        elif len(s) >= 2 and "_embedding" not in k.replace("patch_embedding", "patch"):
            out[k] = t / math.sqrt(math.prod(s[1:]))
        else:
            out[k] = 0.5 * t
    return out


def word_tokenizer(words: Iterable[str], eos_post_processor: bool = True) -> Tokenizer:
    """A whitespace word-level tokenizer with umT5's special ids (<pad> 0, </s> 1, <unk> 2)."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIAL_WORDS, *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos_post_processor:  # as google/umt5-xxl's tokenizer.json does
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def random_vae_state(arch: VaeArch, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised VAE of arch, with official (`Wan2.1_VAE.pth`) key names."""
    torch.manual_seed(seed)
    sd = AutoencoderKLWan(**vae_config(arch)).state_dict()
    return {vae_key(k, arch.num_res_blocks, to_diffusers=False): v for k, v in sd.items()}


def write_tiny_model(root: str | Path, task: str = "t2v", dit: WanModel | None = None,
                     archs: ComponentArchs | None = None, vae_state: dict | None = None,
                     t5_state: dict | None = None, clip_state: dict | None = None,
                     words: Iterable[str] = (), seed: int = 0, distill: WanModel | None = None,
                     causal: WanModel | None = None) -> Path:
    """Write a complete official-layout model folder; random weights for any part not given.

    distill / causal: student DiTs written to distill_models/distill_model.safetensors and
    causvid_models/causal_model.safetensors, as LightX2V expects them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archs = archs or ComponentArchs(t5=TINY_T5, clip=TINY_CLIP, vae=TINY_VAE)
    if dit is None:
        torch.manual_seed(seed)
        dit = WanModel(TINY_I2V if task == "i2v" else TINY_T2V).init_weights()
        with torch.no_grad():  # init_weights zeroes the head: give the random model a visible output
            torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    arch: DiTArch = dit.arch
    if arch.text_dim != archs.t5.dim or arch.out_dim != archs.vae.z_dim:
        raise ValueError(f"DiT text_dim/out_dim ({arch.text_dim}/{arch.out_dim}) must match T5 dim {archs.t5.dim} "
                         f"and VAE z_dim {archs.vae.z_dim}")
    if arch.is_i2v and arch.img_dim != archs.clip.width:
        raise ValueError(f"DiT img_dim {arch.img_dim} must match CLIP width {archs.clip.width}")
    (root / "config.json").write_text(json.dumps(arch.to_config_json(), indent=1))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "diffusion_pytorch_model.safetensors"))
    (root / "wanserve.json").write_text(json.dumps(archs.model_dump(mode="json"), indent=1))
    torch.save(t5_state or random_weights(t5_official_shapes(archs.t5), seed + 1), root / T5_FILE)
    torch.save(vae_state or random_vae_state(archs.vae, seed + 2), root / VAE_FILE)
    if arch.is_i2v:
        torch.save(clip_state or random_weights(clip_official_shapes(archs.clip, textual=False), seed + 3),
                   root / CLIP_FILE)
    tok_dir = root / archs.tokenizer_dir
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(words)
    if tok.get_vocab_size() > archs.t5.vocab_size:
        raise ValueError(f"{tok.get_vocab_size()} words do not fit the T5 vocabulary of {archs.t5.vocab_size}")
    tok.save(str(tok_dir / "tokenizer.json"))
    for student, mc in ((distill, registry.DISTILL), (causal, registry.CAUSVID)):
        if student is not None:
            sub, stem = mc.student
            (root / sub).mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(root / sub / f"{stem}.safetensors"))
    return root
