"""Conditioning encoders: umT5-XXL for the prompt, the CLIP ViT-H/14 image tower for I2V.

Both are standard transformers models (`UMT5EncoderModel`, `CLIPVisionModel`) that run once per request
outside the parallel hot path, so the library implementation is used; what we own is where Wan differs:
its key names (`convert_*_official`), its T5 text conventions (cleaning, truncation with `</s>` kept,
zero-padded context) and its CLIP cut (the output of the second-to-last block). Weights load strictly;
`t5_quantized` / `clip_quantized` make the block linears weight-only int8/fp8 (model/quant.py).
Details: ARCHITECTURE.md.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import ftfy
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from tokenizers import Tokenizer
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
from transformers.initialization import no_init_weights

from .archs import ClipArch, T5Arch
from .checkpoint import CheckpointError, ModelFolder, StateDict, convert_keys, load_into, load_state_dict, strip_prefix
from .quant import QuantLinear, quantize_linears

PAD_ID = 0  # umT5 <pad>; padded positions are masked out and zeroed, so only the mask matters
EOS_TOKEN = "</s>"


def _build(cls, config, dtype: torch.dtype, device: str | torch.device):
    """An empty model of `cls` directly in dtype on device; no random init since every weight is loaded next."""
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; UMT5 shares `shared` with `encoder.embed_tokens`
    return model.eval().requires_grad_(False)


def _component_config(folder: ModelFolder, sub: str) -> dict:
    try:
        cfg = folder.component_config(sub)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder.root / sub / 'config.json'} is not valid JSON: {e}") from None
    if cfg is None:
        raise CheckpointError(f"config not found: {folder.root / sub / 'config.json'}")
    return cfg


def _hf_config(cls, cfg: dict, where: Path, **overrides):
    try:
        return cls.from_dict({**cfg, **overrides})
    except (StrictDataclassError, TypeError, ValueError) as e:  # transformers configs validate on creation
        raise CheckpointError(f"{where}: not a valid {cls.__name__}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Weight-only int8/fp8 (t5_quantized / clip_quantized): the attention and MLP linears of every block
# --------------------------------------------------------------------------------------------------
_T5_QUANT = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))")
_CLIP_QUANT = re.compile(r"encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])")


class _UncastLinear(torch.nn.Module):
    """Holds a QuantLinear where transformers' UMT5 FFN reads `wo.weight`: it casts its input to that dtype
    unless it is int8, so an fp8 weight would cast the activations to fp8. This holder has no `.weight`; the
    QuantLinear casts its input to its compute dtype (the dtype the float `wo` had, hence the same cast)."""

    weight = None

    def __init__(self, linear: QuantLinear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def quantize_text_encoder(model: UMT5EncoderModel, scheme: str) -> list[str]:
    """The umT5 blocks' q/k/v/o and wi_0/wi_1/wo linears as weight-only QuantLinear; returns their names."""
    names = [n for n, _ in model.named_modules() if _T5_QUANT.fullmatch(n)]
    quantize_linears(model, names, scheme, wrap=_UncastLinear)
    return names


def quantize_image_encoder(model: CLIPVisionModel, scheme: str) -> list[str]:
    """The CLIP blocks' q/k/v/out projections and fc1/fc2 as weight-only QuantLinear; returns their names."""
    names = [n for n, _ in model.named_modules() if _CLIP_QUANT.fullmatch(n)]
    quantize_linears(model, names, scheme)
    return names


# --------------------------------------------------------------------------------------------------
# Text encoder: umT5-XXL (encoder only)
# --------------------------------------------------------------------------------------------------
def t5_config(arch: T5Arch) -> UMT5Config:
    """transformers config equal to Wan's `umt5_xxl(encoder_only=True)`.

    "gated-gelu" gives wi_0 (Wan's ffn.gate) the tanh GELU ("gelu_new") and leaves wi_1 (ffn.fc1) linear;
    UMT5 does not scale q.k by 1/sqrt(d) and gives every layer its own relative bias, like Wan.
    """
    return UMT5Config(
        vocab_size=arch.vocab_size, d_model=arch.dim, d_kv=arch.dim_attn // arch.num_heads, d_ff=arch.ffn_dim,
        num_layers=arch.num_layers, num_heads=arch.num_heads, relative_attention_num_buckets=arch.num_buckets,
        relative_attention_max_distance=arch.max_distance, layer_norm_epsilon=arch.eps, dropout_rate=0.0,
        feed_forward_proj="gated-gelu")


_T5_RULES = [
    (r"^token_embedding\.", "shared."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.block.\1.layer.0.SelfAttention."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^norm\.", "encoder.final_layer_norm."),
]
_T5_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def _tie_t5_embeddings(sd: StateDict) -> StateDict:
    """UMT5EncoderModel's state dict holds the (tied) token embedding twice; files hold it once."""
    a, b = _T5_TIED
    if a in sd and b not in sd:
        sd[b] = sd[a]
    elif b in sd and a not in sd:
        sd[a] = sd[b]
    return sd


def convert_t5_official(sd: StateDict) -> StateDict:
    """Wan's T5 keys (`blocks.N.attn.q.weight`, ...) -> UMT5EncoderModel keys. Unknown keys pass unchanged."""
    return _tie_t5_embeddings(convert_keys(sd, _T5_RULES))


def clean_text(text: str) -> str:
    """Wan's `whitespace_clean(basic_clean(text))`."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompts -> umT5 context [B, text_len, dim] (zeros after each prompt's tokens) and lengths [B]."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: Tokenizer, text_len: int = 512):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if self.eos_id is None:
            raise CheckpointError(f"the tokenizer has no {EOS_TOKEN} token (not an umT5 tokenizer?)")
        tokenizer.enable_truncation(max_length=text_len)  # counts the </s> a post-processor adds
        tokenizer.no_padding()  # we pad (and mask) ourselves
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def load(cls, folder: ModelFolder, arch: T5Arch = T5Arch(), tokenizer_subdir: str = "google/umt5-xxl",
             text_len: int = 512, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             quant_scheme: str | None = None) -> "TextEncoder":
        """Official layout: Wan's .pth (converted, `arch` gives the sizes) + `<tokenizer_subdir>/tokenizer.json`.
        Diffusers layout: `text_encoder/` (config.json + transformers weights) + `tokenizer/tokenizer.json`.
        quant_scheme (int8-* / fp8-*): the block linears quantized on load (`t5_quantized`)."""
        tok_path = folder.tokenizer_dir(tokenizer_subdir) / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"cannot read tokenizer {tok_path}: {e}") from None
        path = folder.text_encoder()
        sd = load_state_dict(path)
        if folder.diffusers:
            cfg = _component_config(folder, "text_encoder")
            config = _hf_config(UMT5Config, cfg, folder.root / "text_encoder/config.json")
            sd = _tie_t5_embeddings(sd)
        else:
            config, sd = t5_config(arch), convert_t5_official(sd)
        model = _build(UMT5EncoderModel, config, dtype, device)
        load_into(model, sd, "umT5 text encoder (transformers UMT5EncoderModel names)", str(path))
        del sd
        if quant_scheme:
            quantize_text_encoder(model, quant_scheme)
        return cls(model, tokenizer, text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, truncated, `</s>`-terminated ids padded with 0 to text_len, and the mask (both [B, text_len])."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        ids = torch.full((len(prompts), self.text_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, enc in enumerate(self.tokenizer.encode_batch([clean_text(p) for p in prompts])):
            t = enc.ids
            if not t or t[-1] != self.eos_id:  # the tokenizer has no post-processor appending </s>
                t = t[: self.text_len - 1] + [self.eos_id]
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        return ids, mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context float32 [B, text_len, dim], lens LongTensor [B]); all text_len positions run, keys masked."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return out.masked_fill(mask[..., None] == 0, 0.0), mask.sum(1)


# --------------------------------------------------------------------------------------------------
# Image encoder: CLIP ViT-H/14 visual tower, output of the second-to-last block
# --------------------------------------------------------------------------------------------------
def clip_config(arch: ClipArch) -> CLIPVisionConfig:
    """transformers config of Wan's ViT cut after block num_layers-1 (exact GELU, pre-norm, no patch bias)."""
    return CLIPVisionConfig(
        hidden_size=arch.width, intermediate_size=int(arch.width * arch.mlp_ratio),
        num_hidden_layers=arch.num_layers - 1, num_attention_heads=arch.num_heads, num_channels=3,
        image_size=arch.image_size, patch_size=arch.patch_size, hidden_act="gelu", layer_norm_eps=arch.eps)


_CLIP_BLOCK = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
               "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
_CLIP_BLOCK_KEY = re.compile(r"transformer\.(\d+)\.(.+)\.(weight|bias)")


def convert_clip_official(sd: StateDict, num_blocks: int | None = None) -> StateDict:
    """Wan's open-clip `visual.*` keys -> CLIPVisionModel keys, keeping the first `num_blocks` blocks
    (default: all but the last, as Wan uses). `visual.head`, `log_scale` and `textual.*` are dropped."""
    vis = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    depth = 1 + max((int(m[1]) for k in vis if (m := _CLIP_BLOCK_KEY.fullmatch(k))), default=-1)
    if depth == 0:
        raise CheckpointError("no visual.transformer.N.* keys: not an open-clip ViT checkpoint")
    keep = depth - 1 if num_blocks is None else num_blocks
    out: StateDict = {}
    for k, v in vis.items():
        if m := _CLIP_BLOCK_KEY.fullmatch(k):
            i, name, kind = int(m[1]), m[2], m[3]
            if i >= keep:
                continue
            p = f"encoder.layers.{i}."
            if name == "attn.to_qkv":  # fused rows [q; k; v] (upstream: .view(b, s, 3, n, d).unbind(2))
                for n, t in zip("qkv", v.chunk(3)):
                    out[f"{p}self_attn.{n}_proj.{kind}"] = t
            else:
                out[f"{p}{_CLIP_BLOCK.get(name, name)}.{kind}"] = v
        elif k == "cls_embedding":  # [1, 1, W] -> [W]
            out["embeddings.class_embedding"] = v.reshape(-1)
        elif k == "pos_embedding":  # [1, N, W] -> [N, W]
            out["embeddings.position_embedding.weight"] = v.reshape(-1, v.shape[-1])
        elif k.startswith("patch_embedding."):
            out[f"embeddings.{k}"] = v
        elif k.startswith("pre_norm."):
            out[k.replace("pre_norm.", "pre_layrnorm.")] = v
        elif k.startswith("post_norm."):  # unused for tokens (transformers only norms the pooled cls) but loaded
            out[k.replace("post_norm.", "post_layernorm.")] = v
        elif k != "head":  # head: the image->text projection, unused
            out[k] = v  # unknown: reported as unexpected by the strict load
    return out


def _diffusers_clip_weights(sd: StateDict, num_layers: int) -> StateDict:
    """A full diffusers/LAION CLIPVisionModel file -> our model one block short."""
    sd = strip_prefix(sd, ["vision_model."])  # transformers 4.x wrote `vision_model.*`
    last = f"encoder.layers.{num_layers - 1}."
    return {k: v for k, v in sd.items()
            if not k.startswith((last, "visual_projection.")) and k != "embeddings.position_ids"}


class ImageEncoder:
    """Images [B, 3, H, W] in [-1, 1] -> CLIP tokens [B, (image_size/patch)^2 + 1, width] (Wan's clip_fea)."""

    def __init__(self, model: CLIPVisionModel, mean=ClipArch().mean, std=ClipArch().std):
        self.model = model.eval().requires_grad_(False)
        self.image_size = model.config.image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def load(cls, folder: ModelFolder, arch: ClipArch = ClipArch(), dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", quant_scheme: str | None = None) -> "ImageEncoder":
        """Official layout: Wan's open-clip .pth (`arch` gives the sizes). Diffusers layout: `image_encoder/`
        (config.json + a full CLIPVisionModel; its last block is dropped). `arch` supplies mean/std in both.
        quant_scheme (int8-* / fp8-*): the block linears quantized on load (`clip_quantized`)."""
        path = folder.image_encoder()
        sd = load_state_dict(path)
        if folder.diffusers:
            cfg = _component_config(folder, "image_encoder")
            cfg = cfg.get("vision_config", cfg)  # a full CLIPConfig also works
            where = folder.root / "image_encoder/config.json"
            full = _hf_config(CLIPVisionConfig, cfg, where)
            if full.num_hidden_layers < 2:
                raise CheckpointError(f"{where}: need >= 2 layers (Wan drops the last), got {full.num_hidden_layers}")
            config = _hf_config(CLIPVisionConfig, cfg, where, num_hidden_layers=full.num_hidden_layers - 1)
            sd = _diffusers_clip_weights(sd, full.num_hidden_layers)
        else:
            config, sd = clip_config(arch), convert_clip_official(sd)
        model = _build(CLIPVisionModel, config, dtype, device)
        load_into(model, sd, f"CLIP image encoder ({config.num_hidden_layers} blocks, transformers names)", str(path))
        del sd
        if quant_scheme:
            quantize_image_encoder(model, quant_scheme)
        return cls(model, arch.mean, arch.std)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [B, num_tokens, width]: resize (bicubic), [-1, 1] -> [0, 1], normalize, run the cut tower."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, 3, H, W] with B >= 1 and values in [-1, 1]; got {shape}")
        s = self.image_size
        x = F.interpolate(images.to(self.device, torch.float32), size=(s, s), mode="bicubic", align_corners=False)
        x = (x * 0.5 + 0.5 - self.mean.to(x.device)) / self.std.to(x.device)
        return self.model(pixel_values=x.to(self.dtype)).last_hidden_state.float()
