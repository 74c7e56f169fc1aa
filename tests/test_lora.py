"""LoRA files of every supported naming merge to exactly W + strength * scale * B @ A; bad files fail clearly.

Expected weights are computed here from the factors the test wrote, never through model/lora.py.
"""
import pytest
import torch
from helpers import dit_inputs, tiny_dit
from safetensors.torch import save_file

from model.archs import TINY_I2V, TINY_T2V
from model.checkpoint import dit_key_to_diffusers
from model.config import LoraConfig
from model.lora import LoraError, merge_loras, parse_lora
from model.paths import PathNotAllowed

STRENGTH = 0.7
LAYERS = ["blocks.0.self_attn.q", "blocks.1.cross_attn.k_img", "blocks.0.ffn.0", "head.head"]  # official


def factors(model, layers=LAYERS, rank=3, seed=5, std=0.2):
    """{official module: (B [out, r], A [r, in])} random factors fitting the model's weights.

    std keeps merged weights O(1), so float32 rounding stays far below the 1e-6 comparisons.
    """
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    out = {}
    for m in layers:
        o, i = sd[f"{m}.weight"].shape
        out[m] = (std * torch.randn(o, rank, generator=g), std * torch.randn(rank, i, generator=g))
    return out


def flat(name):
    return name.replace(".", "_")


# name(module) -> file base; up/down suffixes; whether alpha is written; expected scale given (alpha, rank)
FORMATS = {
    "up_down_alpha": (lambda m: f"diffusion_model.{m}", ".lora_up.weight", ".lora_down.weight", 8.0),
    "up_down_no_alpha": (lambda m: m, ".lora_up.weight", ".lora_down.weight", None),
    "peft_A_B": (lambda m: m, ".lora_B.weight", ".lora_A.weight", None),
    "peft_A_B_alpha": (lambda m: f"base_model.model.{m}", ".lora_B.weight", ".lora_A.weight", 1.5),
    "diffusers_transformer": (lambda m: f"transformer.{dit_key_to_diffusers(m)}", ".lora_B.weight",
                              ".lora_A.weight", None),
    "comfy_model_diffusion_model": (lambda m: f"model.diffusion_model.{m}", ".lora_B.weight", ".lora_A.weight", None),
    "kohya": (lambda m: f"lora_unet_{flat(m)}", ".lora_up.weight", ".lora_down.weight", 4.0),
    "kohya_fun": (lambda m: f"lora_unet__{flat(m)}", ".lora_up.weight", ".lora_down.weight", None),
    "kohya_diffusers_names": (lambda m: f"lora_unet_{flat(dit_key_to_diffusers(m))}", ".lora_up.weight",
                              ".lora_down.weight", 2.0),
    "diffusers_old": (lambda m: m, "_lora.up.weight", "_lora.down.weight", None),
    "lora_dot_up": (lambda m: m, ".lora.up.weight", ".lora.down.weight", None),
    "lora_linear_layer": (lambda m: m, ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    "peft_default": (lambda m: m, ".lora_B.default.weight", ".lora_A.default.weight", None),
    "mochi_no_weight_suffix": (lambda m: m, ".lora_B", ".lora_A", None),
}


def lora_file(fac, fmt, dtype=torch.float32):
    base, up, down, alpha = FORMATS[fmt]
    sd = {}
    for m, (b, a) in fac.items():
        sd[base(m) + up] = b.to(dtype)
        sd[base(m) + down] = a.to(dtype)
        if alpha is not None:
            sd[base(m) + ".alpha"] = torch.tensor(alpha)
    return sd


def expected_scale(fmt, rank):
    alpha = FORMATS[fmt][3]
    return alpha / rank if alpha else 1.0


def assert_merged(before, after, want):
    """want: {official key: expected tensor}; every other key bit-identical."""
    for k, w in before.items():
        if k in want:
            assert torch.allclose(after[k], want[k], atol=1e-6, rtol=0), k
            assert not torch.equal(after[k], w), f"{k} unchanged"
        else:
            assert torch.equal(after[k], w), f"{k} changed but no LoRA targets it"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_merges_exactly(tmp_path, fmt):
    model = tiny_dit(TINY_I2V, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fac = factors(model)
    save_file(lora_file(fac, fmt), str(tmp_path / "l.safetensors"))

    report = merge_loras(model, [(tmp_path / "l.safetensors", STRENGTH)], roots=[tmp_path])

    s = STRENGTH * expected_scale(fmt, 3)
    want = {f"{m}.weight": before[f"{m}.weight"] + s * (b @ a) for m, (b, a) in fac.items()}
    assert_merged(before, model.state_dict(), want)
    (entry,) = report.loras
    assert entry.layers == len(LAYERS) and set(entry.targets) == set(want)
    assert "4 weights in 4 layers" in str(report)


def test_full_deltas_diff_diff_b_diff_m(tmp_path):
    """LightX2V extractor output: diffusion_model.X.diff / .diff_b / .diff_m (norms, biases, modulation)."""
    model = tiny_dit(TINY_I2V, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    targets = {"blocks.0.self_attn.q.weight": "diffusion_model.blocks.0.self_attn.q.diff",
               "blocks.0.self_attn.q.bias": "diffusion_model.blocks.0.self_attn.q.diff_b",
               "blocks.1.norm3.weight": "diffusion_model.blocks.1.norm3.diff",
               "blocks.1.cross_attn.k_img.bias": "diffusion_model.blocks.1.cross_attn.k_img.diff_b",
               "blocks.0.modulation": "diffusion_model.blocks.0.diff_m",
               "patch_embedding.weight": "diffusion_model.patch_embedding.diff"}
    deltas = {k: torch.randn(before[k].shape, generator=g) for k in targets}
    save_file({f: deltas[k] for k, f in targets.items()}, str(tmp_path / "d.safetensors"))

    merge_loras(model, [LoraConfig(path="d.safetensors", strength=STRENGTH)], roots=[tmp_path])
    assert_merged(before, model.state_dict(), {k: before[k] + STRENGTH * d for k, d in deltas.items()})


def test_pair_and_bias_diff_on_same_layer():
    """The common LightX2V distill-LoRA shape: lora_up/down/alpha plus diff_b for the same linear."""
    model = tiny_dit(TINY_T2V, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (b, a), = factors(model, ["blocks.1.ffn.0"], rank=4).values()
    db = torch.randn(96)
    sd = {"diffusion_model.blocks.1.ffn.0.lora_up.weight": b, "diffusion_model.blocks.1.ffn.0.lora_down.weight": a,
          "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(2.0), "diffusion_model.blocks.1.ffn.0.diff_b": db}
    report = merge_loras(model, [(sd, STRENGTH)])
    want = {"blocks.1.ffn.0.weight": before["blocks.1.ffn.0.weight"] + STRENGTH * 0.5 * (b @ a),
            "blocks.1.ffn.0.bias": before["blocks.1.ffn.0.bias"] + STRENGTH * db}
    assert_merged(before, model.state_dict(), want)
    assert report.loras[0].layers == 1 and len(report.loras[0].targets) == 2


def test_parse_lora_groups_by_official_key():
    model = tiny_dit(TINY_I2V)
    fac = factors(model)
    deltas = parse_lora(lora_file(fac, "diffusers_transformer"), model.state_dict().keys())
    assert set(deltas) == {f"{m}.weight" for m in LAYERS}
    d = deltas["blocks.1.cross_attn.k_img.weight"]
    assert d.rank == 3 and d.scale == 1.0 and d.shape == (48, 48)
    assert d.keys == ["transformer.blocks.1.attn2.add_k_proj.lora_B.weight",
                      "transformer.blocks.1.attn2.add_k_proj.lora_A.weight"]


def test_bf16_weights_merge_in_float32_then_cast():
    model = tiny_dit(TINY_T2V, seed=4).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fac = factors(model, ["blocks.0.self_attn.q"])
    merge_loras(model, [(lora_file(fac, "up_down_alpha", torch.bfloat16), 1.0)])
    b, a = (t.to(torch.bfloat16).float() for t in fac["blocks.0.self_attn.q"])
    want = (before["blocks.0.self_attn.q.weight"].float() + (8.0 / 3) * (b @ a)).to(torch.bfloat16)
    got = model.state_dict()["blocks.0.self_attn.q.weight"]
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


def test_two_loras_compose_to_the_sum():
    model = tiny_dit(TINY_I2V, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f1 = factors(model, LAYERS[:3], rank=2, seed=1)
    f2 = factors(model, LAYERS[1:], rank=5, seed=2)
    l1, l2 = (lora_file(f1, "up_down_alpha"), 0.7), (lora_file(f2, "peft_A_B"), -0.4)

    report = merge_loras(model, [l1, l2])
    want = {f"{m}.weight": before[f"{m}.weight"].clone() for m in LAYERS}
    for m, (b, a) in f1.items():
        want[f"{m}.weight"] += 0.7 * (8.0 / 2) * (b @ a)
    for m, (b, a) in f2.items():
        want[f"{m}.weight"] += -0.4 * (b @ a)
    assert_merged(before, model.state_dict(), want)
    assert [len(m.targets) for m in report.loras] == [3, 3]

    other = tiny_dit(TINY_I2V, seed=1)
    merge_loras(other, [l2, l1])
    for k, v in other.state_dict().items():
        assert torch.allclose(v, model.state_dict()[k], atol=1e-6, rtol=0), k


class LowRankLinear(torch.nn.Module):
    """x @ W.T + b + strength * scale * (x @ A.T) @ B.T: the unmerged LoRA forward."""

    def __init__(self, base, b, a, s):
        super().__init__()
        self.base, self.b, self.a, self.s = base, b, a, s

    def forward(self, x):
        return self.base(x) + self.s * ((x @ self.a.T) @ self.b.T)


@pytest.mark.parametrize("layer", ["blocks.0.self_attn.q", "blocks.1.cross_attn.k_img", "blocks.0.ffn.0"])
def test_merged_model_equals_explicit_low_rank_path(layer):
    arch = TINY_I2V
    merged, explicit = tiny_dit(arch, seed=6), tiny_dit(arch, seed=6)
    (b, a), = factors(merged, [layer], rank=4, seed=9, std=0.3).values()
    alpha = 2.0
    sd = {f"diffusion_model.{layer}.lora_up.weight": b, f"diffusion_model.{layer}.lora_down.weight": a,
          f"diffusion_model.{layer}.alpha": torch.tensor(alpha)}
    merge_loras(merged, [(sd, STRENGTH)])

    parent_name, _, child = layer.rpartition(".")
    parent = explicit.get_submodule(parent_name)
    setattr(parent, child, LowRankLinear(getattr(parent, child), b, a, STRENGTH * alpha / 4))

    inputs = dit_inputs(arch)
    with torch.no_grad():
        base = tiny_dit(arch, seed=6)(**inputs)
        got, want = merged(**inputs), explicit(**inputs)
    assert (want - base).abs().max() > 1e-3  # the LoRA matters
    assert (got - want).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def pair(base, b_shape, a_shape):
    return {f"{base}.lora_up.weight": torch.zeros(b_shape), f"{base}.lora_down.weight": torch.zeros(a_shape)}


def assert_fails_untouched(model, loras, *needles, roots=None, exc=LoraError):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc) as e:
        merge_loras(model, loras, roots=roots)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert_merged(before, model.state_dict(), {})
    return str(e.value)


def test_merge_into_quantized_weights_is_refused():
    """A LoRA added to 8-bit codes would corrupt them: merge first, quantize after."""
    from model.quant import quantize_dit

    model = quantize_dit(tiny_dit(TINY_T2V), "int8")
    lora = (lora_file(factors(tiny_dit(TINY_T2V), ["blocks.0.self_attn.q"]), "up_down_alpha"), 1.0)
    assert_fails_untouched(model, [lora], "blocks.0.self_attn.q.weight is torch.int8", "then quantize")


def test_unmatched_key_is_named():
    model = tiny_dit(TINY_T2V)
    good = (lora_file(factors(model, ["blocks.0.self_attn.q"]), "up_down_alpha"), 1.0)
    # k_img exists only in I2V models: an I2V LoRA on a T2V model must fail, not half-apply.
    bad = pair("diffusion_model.blocks.0.cross_attn.k_img", (48, 2), (2, 48))
    assert_fails_untouched(model, [good, (bad, 1.0)], "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight",
                           "<state dict #1>", "matches no weight")
    assert_fails_untouched(model, [(pair("lora_unet_blocks_0_self_attn_qq", (48, 2), (2, 48)), 1.0)],
                           "lora_unet_blocks_0_self_attn_qq.lora_up.weight")
    assert_fails_untouched(model, [({"blocks.0.self_attn.q.lokr_w1": torch.zeros(2, 2)}, 1.0)],
                           "blocks.0.self_attn.q.lokr_w1", "not supported")


def test_rank_mismatch_names_key_and_shapes():
    model = tiny_dit(TINY_T2V)
    msg = assert_fails_untouched(model, [(pair("blocks.0.ffn.0", (96, 4), (3, 48)), 1.0)],
                                 "blocks.0.ffn.0.lora_up.weight", "(96, 4)", "(3, 48)", "rank mismatch")
    assert "<state dict #0>" in msg


def test_shape_mismatch_names_key_expected_found(tmp_path):
    model = tiny_dit(TINY_T2V)
    save_file(pair("blocks.0.ffn.0", (48, 4), (4, 96)), str(tmp_path / "wrong.safetensors"))
    assert_fails_untouched(model, [LoraConfig(path="wrong.safetensors", strength=1.0)],
                           "wrong.safetensors", "blocks.0.ffn.0.lora_up.weight", "expected shape (96, 48)",
                           "found (48, 96)", roots=[tmp_path])
    assert_fails_untouched(model, [({"blocks.0.ffn.0.diff_b": torch.zeros(48)}, 1.0)],
                           "blocks.0.ffn.0.diff_b", "expected (96,)", "found (48,)")


def test_missing_partner():
    model = tiny_dit(TINY_T2V)
    up_only = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(48, 2)}
    assert_fails_untouched(model, [(up_only, 1.0)], "blocks.0.self_attn.q.lora_up.weight", "lora_down partner")
    a_only = {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 48)}
    assert_fails_untouched(model, [(a_only, 1.0)], "blocks.0.self_attn.q.lora_A.weight", "lora_up partner")


def test_two_entries_for_one_weight_and_stray_alpha():
    model = tiny_dit(TINY_T2V)
    twice = {**pair("diffusion_model.blocks.0.ffn.0", (96, 2), (2, 48)), **pair("blocks.0.ffn.0", (96, 2), (2, 48))}
    assert_fails_untouched(model, [(twice, 1.0)], "both change blocks.0.ffn.0.weight")
    stray = {"blocks.0.ffn.0.alpha": torch.tensor(1.0), "blocks.0.ffn.0.diff_b": torch.zeros(96)}
    assert_fails_untouched(model, [(stray, 1.0)], "blocks.0.ffn.0.alpha", "no lora_up/lora_down pair")
    assert_fails_untouched(model, [(pair("blocks.0.ffn.0", (96, 2), (2, 48)), float("nan"))], "finite")


def test_paths_only_under_roots(tmp_path):
    model = tiny_dit(TINY_T2V)
    root, outside = tmp_path / "loras", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    sd = lora_file(factors(model, ["blocks.0.self_attn.q"]), "up_down_alpha")
    save_file(sd, str(outside / "x.safetensors"))
    save_file(sd, str(root / "ok.safetensors"))
    assert_fails_untouched(model, [(outside / "x.safetensors", 1.0)], roots=[root], exc=PathNotAllowed)
    assert_fails_untouched(model, [("../elsewhere/x.safetensors", 1.0)], roots=[root], exc=PathNotAllowed)
    assert_fails_untouched(model, [(root / "ok.safetensors", 1.0)], roots=None, exc=PathNotAllowed)
    assert_fails_untouched(model, [("nope.safetensors", 1.0)], "nope.safetensors", roots=[root],
                           exc=FileNotFoundError)
    assert merge_loras(model, [("ok.safetensors", 1.0)], roots=[root]).loras[0].name == "ok.safetensors"


def test_unreadable_file_gives_checkpoint_error_text(tmp_path):
    model = tiny_dit(TINY_T2V)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_fails_untouched(model, [LoraConfig(path="broken.safetensors", name="my-lora")],
                           "my-lora", "cannot read safetensors file", "broken.safetensors", roots=[tmp_path])
