"""Encoders: key conversion at full size (meta), numerics against plain-torch re-implementations of Wan's
formulas (shared/reference/wan_xdit.md §2 and §4), tokenizer conventions, both folder layouts, bad files."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import CLIPVisionModel, UMT5EncoderModel

from model.archs import ClipArch, T5Arch
from model.checkpoint import CLIP_FILE, T5_FILE, CheckpointError, ModelFolder
from model.encoders import (
    ImageEncoder,
    TextEncoder,
    clean_text,
    clip_config,
    convert_clip_official,
    convert_t5_official,
    t5_config,
)
from model.tiny import TINY_CLIP, TINY_T5, clip_official_shapes, random_weights, t5_official_shapes, word_tokenizer

WORDS = ["<pad>", "</s>", "<unk>", "&", "a", "b", "c", "d", "e", "f", "g", "h", "the", "cat", "dog", "sits", "runs"]


def meta(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# --------------------------------------------------------------------------------------------------
# Independent plain-torch versions of Wan's T5 and CLIP (reference formulas, not the transformers code)
# --------------------------------------------------------------------------------------------------
def ref_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    num_buckets //= 2
    buckets = (rel > 0).long() * num_buckets
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def ref_t5(sd, a: T5Arch, ids, mask):
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.eps) * w

    b, L = ids.shape
    n, c = a.num_heads, a.dim_attn // a.num_heads
    pos = torch.arange(L)
    bucket = ref_bucket(pos[None, :] - pos[:, None], a.num_buckets, a.max_distance)  # key - query
    x = sd["token_embedding.weight"][ids]
    for i in range(a.num_layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{t}.weight"]).view(b, L, n, c) for t in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None].repeat(b, 1, 1, 1)
        bias = bias.masked_fill(mask.view(b, 1, 1, L) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)  # no 1/sqrt(c)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, L, n * c), sd[p + "attn.o.weight"])
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


def ref_clip(sd, a: ClipArch, images):
    def ln(x, name):
        return F.layer_norm(x, (a.width,), sd[name + ".weight"], sd[name + ".bias"], a.eps)

    x = F.interpolate(images, size=(a.image_size, a.image_size), mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor(a.mean).view(1, 3, 1, 1)) / torch.tensor(a.std).view(1, 3, 1, 1)
    x = F.conv2d(x, sd["visual.patch_embedding.weight"], stride=a.patch_size).flatten(2).transpose(1, 2)
    b, n, d = x.shape[0], a.num_heads, a.width // a.num_heads
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], 1) + sd["visual.pos_embedding"]
    x = ln(x, "visual.pre_norm")
    for i in range(a.num_layers - 1):  # Wan: transformer[:-1]
        p = f"visual.transformer.{i}."
        h = ln(x, p + "norm1")
        q, k, v = F.linear(h, sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"]).view(b, -1, 3, n, d).unbind(2)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) / math.sqrt(d), dim=-1)
        o = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, a.width)
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = ln(x, p + "norm2")
        h = F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------
def make_tokenizer(eos_post_processor: bool) -> Tokenizer:
    return word_tokenizer(WORDS, eos_post_processor)


def write_official(root, t5_sd=None, clip_sd=None, eos_post_processor=True, tokenizer=True):
    root.mkdir(parents=True, exist_ok=True)
    if t5_sd is not None:
        torch.save(t5_sd, root / T5_FILE)
    if clip_sd is not None:
        torch.save(clip_sd, root / CLIP_FILE)
    if tokenizer:
        (root / "google/umt5-xxl").mkdir(parents=True, exist_ok=True)
        make_tokenizer(eos_post_processor).save(str(root / "google/umt5-xxl/tokenizer.json"))
    return ModelFolder.open(root)


def write_diffusers(root, t5_sd, clip_sd, t5_arch=TINY_T5, clip_arch=TINY_CLIP, clip_prefix="vision_model."):
    """text_encoder/ via save_pretrained; image_encoder/ = the FULL tower (all blocks), as diffusers ships it."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    (root / "tokenizer").mkdir()
    make_tokenizer(True).save(str(root / "tokenizer/tokenizer.json"))
    te = UMT5EncoderModel(t5_config(t5_arch))
    te.load_state_dict(convert_t5_official(t5_sd))
    te.save_pretrained(root / "text_encoder")
    cfg = clip_config(clip_arch)
    cfg.num_hidden_layers = clip_arch.num_layers
    full = CLIPVisionModel(cfg)
    full.load_state_dict(convert_clip_official(clip_sd, num_blocks=clip_arch.num_layers))
    if clip_prefix:  # transformers-4 era file: prefixed keys and the position_ids buffer
        sd = {clip_prefix + k: v for k, v in full.state_dict().items()}
        sd[clip_prefix + "embeddings.position_ids"] = torch.arange(clip_arch.num_tokens)[None]
        cfg.save_pretrained(root / "image_encoder")
        save_file(sd, str(root / "image_encoder/model.safetensors"))
    else:
        full.save_pretrained(root / "image_encoder")
    return ModelFolder.open(root)


@pytest.fixture(scope="module")
def t5_sd():
    return random_weights(t5_official_shapes(TINY_T5), seed=0)


@pytest.fixture(scope="module")
def clip_sd():
    return random_weights(clip_official_shapes(TINY_CLIP, textual=False), seed=1)


def images(b=2, h=40, w=36, seed=2):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


PROMPTS = ["the cat sits", "a  &amp;amp; b", "", "a b c d e f g h the cat dog sits runs a b c d e f g h the dog"]


# --------------------------------------------------------------------------------------------------
# Full-size key conversion on the meta device
# --------------------------------------------------------------------------------------------------
def test_t5_xxl_keys_meta():
    shapes = t5_official_shapes(T5Arch())
    assert len(shapes) == 242 and shapes["token_embedding.weight"] == (256384, 4096)
    converted = convert_t5_official(meta(shapes))
    with torch.device("meta"):
        expected = UMT5EncoderModel(t5_config(T5Arch())).state_dict()
    print(f"umT5-XXL: {len(shapes)} official tensors -> {len(converted)} (embedding tied twice), model {len(expected)}")
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert sum(v.numel() for k, v in expected.items() if k != "encoder.embed_tokens.weight") == 5_680_910_336


def test_clip_vith_keys_meta():
    a = ClipArch()
    shapes = clip_official_shapes(a)
    converted = convert_clip_official(meta(shapes))
    with torch.device("meta"):
        model = CLIPVisionModel(clip_config(a))
    expected = model.state_dict()
    # The only buffer, embeddings.position_ids, is non-persistent: not in the state dict, nothing to ignore.
    assert [n for n, _ in model.named_buffers()] == ["embeddings.position_ids"]
    assert not any("position_ids" in k for k in expected)
    n_visual = sum(k.startswith("visual.") for k in shapes)
    print(f"CLIP ViT-H: {n_visual} visual tensors (32 blocks) -> {len(converted)} (31 blocks), model {len(expected)}")
    assert len(model.encoder.layers) == 31
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


# --------------------------------------------------------------------------------------------------
# Numerics against the reference formulas
# --------------------------------------------------------------------------------------------------
BUCKETS = {-200: 15, -128: 15, -64: 14, -32: 12, -16: 10, -12: 9, -8: 8, -7: 7, -1: 1, 0: 0, 1: 17, 7: 23, 8: 24,
           12: 25, 16: 26, 32: 28, 64: 30, 128: 31, 500: 31}


def test_relative_position_buckets():
    rel = torch.tensor(list(BUCKETS))
    want = torch.tensor(list(BUCKETS.values()))
    assert torch.equal(ref_bucket(rel), want)
    attn = UMT5EncoderModel(t5_config(TINY_T5)).encoder.block[1].layer[0].SelfAttention
    assert attn.has_relative_attention_bias  # umT5: every layer its own bias
    assert torch.equal(attn._relative_position_bucket(rel), want)


@pytest.mark.parametrize("arch", [TINY_T5, TINY_T5.model_copy(update=dict(dim_attn=48, num_buckets=8, max_distance=12))],
                         ids=["xxl-buckets", "clamped-buckets"])
def test_t5_matches_reference(tmp_path, arch):
    sd = random_weights(t5_official_shapes(arch), seed=3)
    enc = TextEncoder.load(write_official(tmp_path, t5_sd=sd), arch, text_len=40)
    context, lens = enc.encode(PROMPTS)
    ids, mask = enc.tokenize(PROMPTS)
    want = ref_t5(sd, arch, ids, mask) * mask[..., None]
    diff = (context - want).abs().max().item()
    print(f"T5 {arch.dim_attn=} {arch.num_buckets=} {arch.max_distance=}: max |diff| = {diff:.2e}")
    assert context.dtype == torch.float32 and context.shape == (4, 40, arch.dim)
    assert diff <= 1e-5
    assert lens.tolist() == [4, 4, 1, 24]


def test_clip_matches_reference(tmp_path, clip_sd):
    enc = ImageEncoder.load(write_official(tmp_path, t5_sd={}, clip_sd=clip_sd, tokenizer=False), TINY_CLIP)
    assert len(enc.model.encoder.layers) == TINY_CLIP.num_layers - 1
    for x in (images(), images(1, 28, 28)):  # resized, and already image_size
        out = enc.encode(x)
        diff = (out - ref_clip(clip_sd, TINY_CLIP, x)).abs().max().item()
        print(f"CLIP input {tuple(x.shape)}: max |diff| = {diff:.2e}")
        assert out.shape == (x.shape[0], TINY_CLIP.num_tokens, TINY_CLIP.width) and out.dtype == torch.float32
        assert diff <= 1e-5
    # transformers does not post-norm last_hidden_state: with a different post_norm the tokens are unchanged
    hf = enc.model(pixel_values=torch.zeros(1, 3, 28, 28))
    enc.model.post_layernorm.weight.mul_(3)
    assert torch.equal(enc.model(pixel_values=torch.zeros(1, 3, 28, 28)).last_hidden_state, hf.last_hidden_state)


# --------------------------------------------------------------------------------------------------
# Tokenizer conventions
# --------------------------------------------------------------------------------------------------
def test_clean_text():
    assert clean_text("a  &amp;amp; b") == "a & b"
    assert clean_text("  x\n\t y  ") == "x y"
    assert clean_text("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


@pytest.mark.parametrize("post", [True, False], ids=["eos-post-processor", "no-post-processor"])
def test_tokenize_and_encode(post, t5_sd):
    model = UMT5EncoderModel(t5_config(TINY_T5))
    model.load_state_dict(convert_t5_official(t5_sd))
    enc = TextEncoder(model, make_tokenizer(post), text_len=6)
    ids, mask = enc.tokenize(PROMPTS)
    v = {w: i for i, w in enumerate(WORDS)}
    assert ids.tolist() == [
        [v["the"], v["cat"], v["sits"], 1, 0, 0],
        [v["a"], v["&"], v["b"], 1, 0, 0],  # "a  &amp;amp; b" -> "a & b"
        [1, 0, 0, 0, 0, 0],
        [v["a"], v["b"], v["c"], v["d"], v["e"], 1],  # truncated at text_len, </s> kept
    ]
    assert ((ids == 1).sum(1) == 1).all()  # </s> exactly once
    assert torch.equal(mask, (torch.arange(6) < torch.tensor([4, 4, 1, 6])[:, None]).long())
    context, lens = enc.encode(PROMPTS)
    assert lens.dtype == torch.long and lens.tolist() == [4, 4, 1, 6]
    for c, n in zip(context, lens):
        assert (c[n:] == 0).all() and (c[:n].abs().sum(-1) > 0).all()
    # each prompt alone gives the same rows: the mask keeps padding out of the valid positions
    alone, _ = enc.encode(PROMPTS[:1])
    assert (alone[0] - context[0]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode([])
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode("the cat")
    with pytest.raises(CheckpointError, match="no </s> token"):
        TextEncoder(model, Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))


# --------------------------------------------------------------------------------------------------
# Official and diffusers layouts load to identical encoders
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip_prefix", ["vision_model.", ""], ids=["prefixed-clip-file", "save_pretrained"])
def test_official_and_diffusers_layouts_agree(tmp_path, t5_sd, clip_sd, clip_prefix):
    t5_bf16 = {k: v.bfloat16() for k, v in t5_sd.items()}  # as released: bf16 .pth, cast to the model dtype
    clip_full = clip_sd | {"visual.head": torch.zeros(32, 16), "log_scale": torch.tensor(4.6),
                           "textual.token_embedding.weight": torch.zeros(10, 8)}  # all dropped
    official = write_official(tmp_path / "official", t5_sd=t5_bf16, clip_sd=clip_full)
    diffusers = write_diffusers(tmp_path / "diffusers", {k: v.float() for k, v in t5_bf16.items()}, clip_sd,
                                clip_prefix=clip_prefix)
    assert (official.layout, diffusers.layout) == ("official", "diffusers")
    te_o, te_d = TextEncoder.load(official, TINY_T5, text_len=8), TextEncoder.load(diffusers, text_len=8)
    (ctx_o, lens_o), (ctx_d, lens_d) = te_o.encode(PROMPTS), te_d.encode(PROMPTS)
    assert torch.equal(ctx_o, ctx_d) and torch.equal(lens_o, lens_d)
    ie_o, ie_d = ImageEncoder.load(official, TINY_CLIP), ImageEncoder.load(diffusers, TINY_CLIP)
    assert len(ie_d.model.encoder.layers) == TINY_CLIP.num_layers - 1
    assert torch.equal(ie_o.encode(images()), ie_d.encode(images()))


def test_bf16_load(tmp_path, t5_sd, clip_sd):
    folder = write_official(tmp_path, t5_sd=t5_sd, clip_sd=clip_sd)
    te = TextEncoder.load(folder, TINY_T5, text_len=8, dtype=torch.bfloat16)
    assert te.model.shared.weight.dtype == torch.bfloat16 and te.model.shared.weight is te.model.encoder.embed_tokens.weight
    ctx, _ = te.encode(PROMPTS)
    ref, _ = TextEncoder.load(folder, TINY_T5, text_len=8).encode(PROMPTS)
    assert ctx.dtype == torch.float32 and (ctx - ref).abs().mean() < 0.05 * ref.abs().mean()
    ie = ImageEncoder.load(folder, TINY_CLIP, dtype=torch.bfloat16)
    assert ie.encode(images()).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Bad files and inputs
# --------------------------------------------------------------------------------------------------
def test_missing_or_broken_tokenizer(tmp_path, t5_sd):
    folder = write_official(tmp_path, t5_sd=t5_sd, tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer not found.*google/umt5-xxl/tokenizer.json"):
        TextEncoder.load(folder, TINY_T5)
    (tmp_path / "google/umt5-xxl").mkdir(parents=True)
    (tmp_path / "google/umt5-xxl/tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        TextEncoder.load(folder, TINY_T5)


def test_wrong_shapes_and_missing_keys(tmp_path, t5_sd, clip_sd):
    bad = dict(t5_sd)
    bad["blocks.1.attn.k.weight"] = torch.zeros(32, 16)
    with pytest.raises(CheckpointError) as e:
        TextEncoder.load(write_official(tmp_path / "a", t5_sd=bad), TINY_T5)
    msg = str(e.value)
    assert "encoder.block.1.layer.0.SelfAttention.k.weight: expected (32, 32), found (32, 16)" in msg
    assert T5_FILE in msg

    bad = {k: v for k, v in t5_sd.items() if k != "norm.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing keys.*encoder\.final_layer_norm\.weight"):
        TextEncoder.load(write_official(tmp_path / "b", t5_sd=bad), TINY_T5)

    with pytest.raises(CheckpointError, match="shape mismatch for shared.weight: expected"):
        TextEncoder.load(write_official(tmp_path / "c", t5_sd=t5_sd), TINY_T5.model_copy(update=dict(vocab_size=65)))

    bad = clip_sd | {"visual.pos_embedding": torch.zeros(1, 10, 32)}
    with pytest.raises(CheckpointError, match=r"embeddings\.position_embedding\.weight: expected \(5, 32\), found \(10, 32\)"):
        ImageEncoder.load(write_official(tmp_path / "d", t5_sd={}, clip_sd=bad, tokenizer=False), TINY_CLIP)

    with pytest.raises(CheckpointError, match="no visual.transformer"):
        convert_clip_official({"textual.head.weight": torch.zeros(2)})


def test_diffusers_bad_configs(tmp_path, t5_sd, clip_sd):
    folder = write_diffusers(tmp_path / "d", t5_sd, clip_sd)
    (folder.root / "text_encoder/config.json").unlink()
    with pytest.raises(CheckpointError, match="config not found.*text_encoder"):
        TextEncoder.load(folder)
    (folder.root / "text_encoder/config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="text_encoder/config.json is not valid JSON"):
        TextEncoder.load(folder)
    cfg_path = folder.root / "image_encoder/config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"hidden_size": 30}))
    with pytest.raises(CheckpointError, match="image_encoder/config.json: not a valid CLIPVisionConfig"):
        ImageEncoder.load(folder, TINY_CLIP)


# --------------------------------------------------------------------------------------------------
# Weight-only int8 / fp8 encoders (t5_quantized / clip_quantized)
# --------------------------------------------------------------------------------------------------
T5_LINEAR = re.compile(r"blocks\.\d+\.(attn\.[qkvo]|ffn\.gate\.0|ffn\.fc1|ffn\.fc2)\.weight")  # Wan's names
CLIP_LINEAR = re.compile(r"visual\.transformer\.\d+\.(attn\.to_qkv|attn\.proj|mlp\.0|mlp\.2)\.weight")
QMAX = {"int8": 127.0, "fp8": 448.0}
# rel-L2 of the quantized encoders' outputs vs full precision (tiny random encoders, fp32 compute), measured
# over weight seeds 0-3: T5 int8 2.1e-2 .. 2.9e-2, fp8 8.5e-2 .. 1.25e-1; CLIP int8 6.3e-3 .. 8.9e-3, fp8
# 3.0e-2 .. 4.4e-2. Random umT5 weights amplify (no 1/sqrt(d) in its attention); what the error is made of is
# asserted exactly (the reference on the rounded weights). Bounds ~3x the worst measurement.
QUANT_REL = {("t5", "int8"): 0.08, ("t5", "fp8"): 0.35, ("clip", "int8"): 0.03, ("clip", "fp8"): 0.12}


def fake_quant(sd, rule, base):
    """Each matching weight rounded per output row and dequantized in fp32: scale = max(absmax, 1e-5)/qmax
    (fused CLIP qkv rows included: the rule is per row)."""
    out = {}
    for k, w in sd.items():
        if rule.fullmatch(k):
            s = torch.clamp(w.float().abs().amax(dim=1, keepdim=True), min=1e-5) / QMAX[base]
            q = (torch.clamp(torch.round(w / s), -127, 127) if base == "int8"
                 else torch.clamp(w / s, -448, 448).to(torch.float8_e4m3fn).float())
            out[k] = q * s
        else:
            out[k] = w
    return out


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme", ["int8-vllm", "fp8-sgl"])
def test_quantized_encoders(tmp_path, t5_sd, clip_sd, scheme):
    """The quantized encoders equal the reference formulas run on the per-row-rounded weights (so the only
    error is the weight rounding, and no activation is cast to 8 bits: transformers' UMT5 casts wo's input to
    wo.weight.dtype unless it is int8), and stay close to full precision."""
    from model.quant import QuantLinear

    base = scheme.split("-")[0]
    folder = write_official(tmp_path, t5_sd=t5_sd, clip_sd=clip_sd)
    te = TextEncoder.load(folder, TINY_T5, text_len=40, quant_scheme=scheme)
    layers = [m for m in te.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == TINY_T5.num_layers * 7 and all(m.scheme == base for m in layers)
    context, _ = te.encode(PROMPTS)
    ids, mask = te.tokenize(PROMPTS)
    want = ref_t5(fake_quant(t5_sd, T5_LINEAR, base), TINY_T5, ids, mask) * mask[..., None]
    assert (context - want).abs().max() <= 1e-5
    full, _ = TextEncoder.load(folder, TINY_T5, text_len=40).encode(PROMPTS)
    t5_err = rel_l2(context, full)

    ie = ImageEncoder.load(folder, TINY_CLIP, quant_scheme=scheme)
    layers = [m for m in ie.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == (TINY_CLIP.num_layers - 1) * 6
    x = images()
    out = ie.encode(x)
    assert (out - ref_clip(fake_quant(clip_sd, CLIP_LINEAR, base), TINY_CLIP, x)).abs().max() <= 1e-5
    clip_err = rel_l2(out, ImageEncoder.load(folder, TINY_CLIP).encode(x))
    print(f"{scheme}: T5 rel-L2 {t5_err:.2e}, CLIP rel-L2 {clip_err:.2e}")
    assert 0 < t5_err < QUANT_REL["t5", base] and 0 < clip_err < QUANT_REL["clip", base]


def test_bad_image_input(tmp_path, clip_sd):
    enc = ImageEncoder.load(write_official(tmp_path, t5_sd={}, clip_sd=clip_sd, tokenizer=False), TINY_CLIP)
    for bad in (torch.zeros(3, 28, 28), torch.zeros(1, 4, 28, 28), torch.zeros(0, 3, 28, 28), [[0.0]]):
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
            enc.encode(bad)
