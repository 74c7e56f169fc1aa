"""Weight-only int8/fp8 DiT linears (model/quant.py) and LightX2V's pre-quantized file layout.

References in this file are computed independently of model/quant.py: the per-row formulas, the float8
e4m3 grid enumerated from its 256 bit patterns, and a re-statement of LightX2V's converter rule
(`tools/convert/converter.py`, wan_dit: every 2-D tensor under blocks.N.{self_attn,cross_attn,ffn}
becomes int8/fp8 + `<key>_scale` [out, 1]; everything else stays float in `non_linear_dtype`).
"""
import math

import pytest
import torch
from helpers import dit_inputs, tiny_dit, write_official_dit
from safetensors.torch import save_file

from model import quant
from model.archs import TINY_I2V, TINY_T2V, WAN21_I2V_14B, WAN21_T2V_14B
from model.checkpoint import CheckpointError, ModelFolder, save_sharded
from model.config import QUANT_SCHEMES, ConfigError, load_run_config
from model.dit import Linear, WanModel
from model.loader import load_pipeline_dit, load_quantized_dit
from model.quant import (
    QuantLinear,
    fp8_compute_mode,
    normalize_scheme,
    quantize_dit,
    quantized_state_dict,
    set_fp8_compute,
    weight_bytes,
)

ARCHS = pytest.mark.parametrize("arch", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
SCHEMES = pytest.mark.parametrize("scheme", ["int8-vllm", "fp8-sgl"])
QDT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
GB = 1e9

# Output error bounds (fp32 tiny DiT, random weights N(0, 0.1^2), fixed inputs). Measured over seeds 0-3 and
# both archs: int8 rel-L2 2.7e-3 .. 6.8e-3, fp8 1.0e-2 .. 2.2e-2. That fits the weight error alone: int8
# rounds to scale/2 with scale = absmax/127 ~ 2.3 sigma/127 of a 48-wide row (rms ~0.5% of sigma); fp8 e4m3
# keeps 3 mantissa bits (relative rms ~2%). Bounds are ~3x the worst measurement.
REL_BOUND = {"int8": 2e-2, "fp8": 6e-2}


def lightx2v_rule(key: str, tensor: torch.Tensor) -> bool:
    """LightX2V converter (wan_dit): key_idx 2 in target_keys, 2-D tensors only."""
    parts = key.split(".")
    return tensor.dim() == 2 and len(parts) > 2 and parts[2] in ("self_attn", "cross_attn", "ffn")


def ref_quant(w: torch.Tensor, base: str):
    """Per-row symmetric quantization, written out: scale = max(absmax, 1e-5) / qmax."""
    w = w.detach().float()
    s = torch.clamp(w.abs().max(dim=1, keepdim=True).values, min=1e-5) / QMAX[base]
    if base == "int8":
        q = torch.clamp(torch.round(w / s), -127, 127).to(torch.int8)
    else:
        q = torch.clamp(w / s, -448, 448).to(torch.float8_e4m3fn)
    return q, s


def lightx2v_convert(sd, base: str, non_linear_dtype=torch.float32):
    """A LightX2V-converter-style file from an unquantized state dict (their key layout and formulas)."""
    out = {}
    for k, v in sd.items():
        if lightx2v_rule(k, v):
            out[k], out[k + "_scale"] = ref_quant(v, base)
        else:
            out[k] = v.to(non_linear_dtype)
    return out


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------
# Schemes and layer selection
# --------------------------------------------------------------------------------------------------
def test_scheme_names():
    for s in ("int8", "int8-vllm", "int8-q8f", "int8-sgl", "int8-torchao", "int8-triton"):
        assert normalize_scheme(s) == "int8"
    for s in ("fp8", "fp8-sgl", "fp8-vllm", "fp8-q8f", "fp8-triton", "fp8-torchao"):
        assert normalize_scheme(s) == "fp8"
    assert {normalize_scheme(s) for s in QUANT_SCHEMES} == {"int8", "fp8"}
    for bad in ("int4-g128-marlin", "nvfp4", "mxfp8", "gguf-Q8_0", "bf16", "int8vllm", ""):
        with pytest.raises(ValueError, match=r"int8-\*.*fp8-\*"):
            normalize_scheme(bad)
    for other_layout in ("fp8-pertensor", "fp8-b128-deepgemm"):
        with pytest.raises(ValueError, match="per-output-channel"):
            normalize_scheme(other_layout)


def test_unknown_scheme_raises_everywhere(tmp_path):
    model = tiny_dit(TINY_T2V)
    with pytest.raises(ValueError, match="unknown quant scheme 'nvfp4'"):
        quantize_dit(model, "nvfp4")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="unknown quant scheme"):
        load_quantized_dit(tmp_path / "missing.safetensors", TINY_T2V, "w8a8")


@ARCHS
def test_quantizes_exactly_lightx2v_layers(arch):
    model = tiny_dit(arch)
    want = {k.removesuffix(".weight") for k, v in model.state_dict().items() if lightx2v_rule(k, v)}
    quantize_dit(model, "int8")
    got = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert got == want
    per_block = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"} | ({"cross_attn.k_img", "cross_attn.v_img"}
                                                                      if arch.is_i2v else set())
    assert got == {f"blocks.{i}.{n}" for i in range(arch.num_layers) for n in per_block}
    # embeddings, time projection, CLIP projection and head stay float (LightX2V builds them "Default")
    kept = [model.text_embedding[0], model.text_embedding[2], model.time_embedding[0], model.time_embedding[2],
            model.time_projection[1], model.head.head] + ([model.img_emb.proj[1], model.img_emb.proj[3]]
                                                          if arch.is_i2v else [])
    assert all(type(m) is Linear and m.weight.dtype == torch.float32 for m in kept)


# --------------------------------------------------------------------------------------------------
# Per-layer numerics
# --------------------------------------------------------------------------------------------------
def fp8_grid() -> torch.Tensor:
    g = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return g[torch.isfinite(g)].unique()


@ARCHS
@SCHEMES
def test_layer_numerics_match_reference(arch, scheme):
    base = normalize_scheme(scheme)
    model = tiny_dit(arch)
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_dit(model, scheme)
    grid = fp8_grid()
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        w = floats[f"{name}.weight"]
        s = torch.clamp(w.abs().max(dim=1, keepdim=True).values, min=1e-5) / QMAX[base]
        assert m.weight.dtype == QDT[base] and m.weight.shape == w.shape
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.shape == (w.shape[0], 1)
        assert torch.equal(m.weight_scale, s)
        assert torch.equal(m.bias, floats[f"{name}.bias"])
        q = m.weight.float()
        assert torch.equal(m.dequantize(torch.float32), q * s)  # dequantized = the per-row formula
        x = torch.clamp(w / s, -448, 448)
        if base == "int8":
            assert torch.equal(q, torch.clamp(torch.round(w / s), -127, 127))
            assert q.abs().max() == 127  # the absmax element of each row hits the top code
            assert bool(((w - q * s).abs() <= s * (0.5 + 1e-5)).all())  # rounding error <= scale/2
        else:
            # q is a nearest e4m3 value to w/s (grid enumerated from the 256 bit patterns)
            nearest = (x.unsqueeze(-1) - grid).abs().min(dim=-1).values
            assert torch.equal((x - q).abs(), nearest)
            assert bool(((w - q * s).abs() <= w.abs() * 2 ** -4 + s * 2 ** -10).all())  # 3 mantissa bits


def test_from_linear_keys_and_dtype_guard():
    lin = Linear(16, 8)
    q = QuantLinear.from_linear(lin, "fp8-vllm")
    assert sorted(q.state_dict()) == ["bias", "weight", "weight_scale"]
    q.to(torch.bfloat16)  # must not turn the fp8 weight into bf16 or round the scale
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16 and q.compute_dtype == torch.bfloat16
    out = q(torch.randn(3, 16))  # fp32 input, bf16 compute (as model.dit.Linear)
    assert out.dtype == torch.bfloat16
    q.float()
    assert q.weight.dtype == torch.float8_e4m3fn and q(torch.randn(3, 16)).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------
@ARCHS
@SCHEMES
def test_quantized_layer_bytes(arch, scheme):
    model = tiny_dit(arch)
    quantize_dit(model, scheme)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    q_bytes = sum(m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * m.weight_scale.element_size()
                  for m in layers)
    bf16_bytes = sum(m.weight.numel() * 2 for m in layers)
    print(f"{arch.model_type} {scheme}: quantized layers {q_bytes} B vs bf16 {bf16_bytes} B "
          f"= {q_bytes / bf16_bytes:.4f}")
    # 1 byte per weight + one fp32 scale per row: (in + 4) / (2 in). The tiny archs have in = 48 or 96, so
    # the ratio is 0.542 / 0.521; at 14B (in >= 5120) it is <= 0.5004 (asserted below on the real shapes).
    for m in layers:
        assert m.weight.element_size() == 1
        nb = m.weight.numel() + m.weight_scale.numel() * 4
        assert nb / (m.weight.numel() * 2) == pytest.approx((m.in_features + 4) / (2 * m.in_features))
    assert q_bytes <= (0.5 + 2 / min(m.in_features for m in layers)) * bf16_bytes


@pytest.mark.parametrize("arch", [WAN21_T2V_14B, WAN21_I2V_14B], ids=["t2v-14B", "i2v-14B"])
@SCHEMES
def test_14b_bytes_halved(arch, scheme):
    with torch.device("meta"):
        model = WanModel(arch)
    model.to(torch.bfloat16)
    bf16 = weight_bytes(model)
    quantize_dit(model, scheme)
    q = weight_bytes(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    q_layers = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in layers)
    bf16_layers = sum(2 * m.weight.numel() for m in layers)
    print(f"{arch.model_type}-14B {scheme}: DiT {bf16 / GB:.2f} GB bf16 -> {q / GB:.2f} GB ({q / bf16:.4f}); "
          f"quantized layers {bf16_layers / GB:.2f} -> {q_layers / GB:.2f} GB ({q_layers / bf16_layers:.4f})")
    assert len(layers) == arch.num_layers * (12 if arch.is_i2v else 10)
    assert q <= 0.52 * bf16
    assert q_layers <= 0.52 * bf16_layers
    assert all(m.weight.dtype == QDT[normalize_scheme(scheme)] and m.bias.dtype == torch.bfloat16 for m in layers)


# --------------------------------------------------------------------------------------------------
# DiT output
# --------------------------------------------------------------------------------------------------
@ARCHS
@SCHEMES
def test_dit_output_error(arch, scheme):
    base = normalize_scheme(scheme)
    model = tiny_dit(arch)
    kw = dit_inputs(arch)
    # independent fake-quant model: plain float linears holding the reference-dequantized weights
    fake = tiny_dit(arch)
    with torch.no_grad():
        ref = model(**kw)
        for k, v in fake.state_dict().items():
            if lightx2v_rule(k, v):
                q, s = ref_quant(v, base)
                v.copy_(q.float() * s)
        expect = fake(**kw)
        quantize_dit(model, scheme)
        out = model(**kw)
    err = rel_l2(out, ref)
    print(f"{arch.model_type} {scheme}: DiT output rel-L2 error vs fp32 = {err:.3e} (bound {REL_BOUND[base]:.0e})")
    assert torch.equal(out, expect)  # all the error is the weight rounding
    assert 0 < err < REL_BOUND[base]


def test_bf16_compute_on_cpu():
    model = tiny_dit(TINY_T2V)
    kw = dit_inputs(TINY_T2V)
    quantize_dit(model, "int8")
    with torch.no_grad():
        ref = model(**kw)
        model.to(torch.bfloat16)
        out = model(**kw)
    assert all(m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
               for m in model.modules() if isinstance(m, QuantLinear))
    err = rel_l2(out.float(), ref)
    print(f"int8 DiT bf16 vs fp32 compute: rel-L2 {err:.3e}")
    assert err < 3e-2


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
@ARCHS
@SCHEMES
def test_save_load_roundtrip(arch, scheme, tmp_path):
    model = quantize_dit(tiny_dit(arch), scheme)
    sd = quantized_state_dict(model)
    base = normalize_scheme(scheme)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):  # LightX2V layout: X.weight 8-bit [out, in], X.weight_scale fp32 [out, 1]
            assert sd[f"{name}.weight"].dtype == QDT[base]
            assert sd[f"{name}.weight_scale"].shape == (m.out_features, 1)
            assert sd[f"{name}.weight_scale"].dtype == torch.float32
    path = tmp_path / "dit_quant.safetensors"
    save_file(sd, str(path))
    loaded = load_quantized_dit(path, arch, scheme, torch.float32, "cpu")
    kw = dit_inputs(arch)
    with torch.no_grad():
        assert torch.equal(loaded(**kw), model(**kw))
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert weight_bytes(loaded) == weight_bytes(model)


def test_load_lightx2v_converter_layouts(tmp_path):
    """Their converter's outputs: one file with bf16 non-linears; a folder of block shards + index; a folder
    of shards without index; the diffusion_model. prefix. All load; 8-bit tensors land unchanged."""
    arch = TINY_I2V
    model = tiny_dit(arch)
    kw = dit_inputs(arch)
    for base in ("int8", "fp8"):
        conv = lightx2v_convert(model.state_dict(), base, torch.bfloat16)
        with torch.no_grad():
            expect = quantize_dit(tiny_dit(arch), base)(**kw)

        single = tmp_path / base / "wan_lightx2v.safetensors"
        single.parent.mkdir()
        save_file(conv, str(single))
        sharded = save_sharded(conv, tmp_path / base / "by_block", "diffusion_pytorch_model", 20_000).parent
        no_index = tmp_path / base / "no_index"
        no_index.mkdir()
        blocks = {}
        for k, v in conv.items():
            blocks.setdefault(k.split(".")[1] if k.startswith("blocks.") else "non_block", {})[k] = v
        for b, part in blocks.items():
            save_file(part, str(no_index / (f"block_{b}.safetensors" if b != "non_block" else "non_block.safetensors")))
        prefixed = tmp_path / base / "prefixed.safetensors"
        save_file({"model.diffusion_model." + k: v for k, v in conv.items()}, str(prefixed))

        for src in (single, sharded, no_index, prefixed):
            loaded = load_quantized_dit(src, arch, base + "-q8f", torch.float32)
            sd = loaded.state_dict()
            for k, v in conv.items():
                if v.dtype in (torch.int8, torch.float8_e4m3fn):
                    assert torch.equal(sd[k], v), k
                else:
                    assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float()), k
            with torch.no_grad():
                err = rel_l2(loaded(**kw), expect)
            assert err < 2e-2  # only the bf16 rounding of the unquantized tensors differs


def _file(tmp_path, sd, name="bad.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_bad_files(tmp_path):
    arch = TINY_T2V
    model = tiny_dit(arch)
    floats = model.state_dict()
    good = quantized_state_dict(quantize_dit(tiny_dit(arch), "int8"))
    key = "blocks.1.ffn.0.weight"

    # a quantized layer stored as float, without its scale
    sd = dict(good, **{key: floats[key]})
    del sd["blocks.1.ffn.0.weight_scale"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.0\.weight is torch\.float32, expected torch\.int8"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8-vllm")

    # the original (unquantized) checkpoint passed as dit_quantized_ckpt
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q\.weight is torch\.float32.*unquantized"):
        load_quantized_dit(_file(tmp_path, floats, "orig.safetensors"), arch, "int8")

    # an fp8 file read with an int8 scheme
    fp8 = quantized_state_dict(quantize_dit(tiny_dit(arch), "fp8"))
    with pytest.raises(CheckpointError, match=r"float8_e4m3fn, expected torch\.int8"):
        load_quantized_dit(_file(tmp_path, fp8, "fp8.safetensors"), arch, "int8-q8f")

    # an int8 weight without its scale
    sd = dict(good)
    del sd["blocks.0.cross_attn.o.weight_scale"]
    with pytest.raises(CheckpointError, match=r"blocks\.0\.cross_attn\.o\.weight_scale is missing"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")

    # missing / unexpected / misshapen keys
    sd = dict(good)
    del sd["head.head.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys.*head\.head\.bias"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")
    sd = dict(good, **{"blocks.0.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.0\.extra\.weight"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")
    sd = dict(good, **{"blocks.0.ffn.2.weight_scale": torch.ones(7, 1)})
    with pytest.raises(CheckpointError, match=r"shape mismatch for blocks\.0\.ffn\.2\.weight_scale"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")

    # an 8-bit tensor where wanserve keeps floats (would be cast silently, its scale lost)
    sd = dict(good, **{"time_projection.1.weight": floats["time_projection.1.weight"].to(torch.int8)})
    with pytest.raises(CheckpointError, match=r"time_projection\.1\.weight is torch\.int8.*unquantized"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")

    # non-finite scale; ComfyUI's per-tensor layout
    sd = dict(good, **{"blocks.0.self_attn.k.weight_scale": torch.full((arch.dim, 1), float("nan"))})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.k\.weight_scale has non-finite"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")
    sd = {k.replace(".weight_scale", ".scale_weight"): v for k, v in good.items()}
    with pytest.raises(CheckpointError, match="ComfyUI"):
        load_quantized_dit(_file(tmp_path, sd), arch, "int8")

    # an empty folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no quantized weights"):
        load_quantized_dit(tmp_path / "empty", arch, "int8")


# --------------------------------------------------------------------------------------------------
# Scaled fp8 GEMMs (dit_fp8_compute)
# --------------------------------------------------------------------------------------------------
# The error bound. e4m3 keeps 3 mantissa bits: rounding to nearest changes a normal value by at most half an
# ulp, 2^-4 of it; below 2^-6 (subnormals, step 2^-9) by at most 2^-10 in units of the row's scale. So each
# activation x_ik becomes x_ik + d_ik with |d_ik| <= 2^-4 |x_ik| + 2^-10 s_i (s_i = the row's absmax / 448),
# exactly as the weights do per output channel. Against the dequantized path (same rounded weights W^) the
# only error is D W^T, and ||D W^T||_F <= ||D||_F ||W^||_2 <= (2^-4 ||X||_F + 2^-10 ||s||_2 sqrt(K)) ||W^||_2:
# a bound for every input, asserted as is. For random X and W the relative errors are spread evenly within
# +-(half an ulp) = +-2^-4/m (mantissa m in [1, 2)), rms below 2^-4/sqrt(3) = 0.036, and a random GEMM's
# relative Frobenius error is that rms (independent terms add in quadrature, as the products do): asserted
# < 0.036 against the dequantized path (activations rounded), < sqrt(2) x 0.036 = 0.051 against the
# unquantized linear (weights and activations rounded independently). Measured: 0.025-0.027, 0.036-0.037.
FP8_HALF_ULP, FP8_SUBNORMAL = 2 ** -4, 2 ** -10
FP8_RMS = 2 ** -4 / math.sqrt(3)
BF16_SLACK = 3 * 2 ** -9  # bf16 compute: input, weight and output each rounded to 8 bits once more
# DiT output, scaled vs dequantized path (tiny archs, seeds 0-3): 1.1e-2 .. 1.7e-2 measured; ~3x the worst
DIT_SCALED_BOUND = 5e-2


def fp8_layer(k: int = 96, n: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(unquantized Linear, its fp8 QuantLinear on the scaled path): weights N(0, 0.1^2), bias N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    lin = Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    lin = lin.to(dtype).eval()
    q = QuantLinear.from_linear(lin, "fp8-sgl")
    assert set_fp8_compute(q, "scaled_mm", "cpu") == "scaled_mm"
    return lin, q


def run_as(q: QuantLinear, mode: str, x: torch.Tensor) -> torch.Tensor:
    old, q.fp8_compute = q.fp8_compute, mode
    try:
        with torch.no_grad():
            return q(x)
    finally:
        q.fp8_compute = old


def test_scaled_mm_is_the_per_token_formula():
    lin, q = fp8_layer()
    x = torch.randn(2, 13, 96, generator=torch.Generator().manual_seed(3))  # 26 tokens: any count
    xq, xs = ref_quant(x.reshape(-1, 96), "fp8")  # per token: scale = max(absmax, 1e-5) / 448
    aq, a_s = quant.fp8_rows(x.reshape(-1, 96))
    assert torch.equal(aq.float(), xq.float()) and torch.equal(a_s, xs)
    wq, ws = ref_quant(lin.weight, "fp8")
    expect = ((xq.double() * xs) @ (wq.double() * ws).T + lin.bias.double()).reshape(2, 13, 64)
    out = run_as(q, "scaled_mm", x)
    assert out.shape == (2, 13, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)  # fp32 accumulation only
    d = xq.float() * xs - x.reshape(-1, 96)
    assert bool((d.abs() <= FP8_HALF_ULP * x.reshape(-1, 96).abs() + FP8_SUBNORMAL * xs).all())
    # other shapes: one token (1-D input), no token
    assert run_as(q, "scaled_mm", x[0, 0]).shape == (64,)
    torch.testing.assert_close(run_as(q, "scaled_mm", x[0, 0]), out[0, 0], rtol=1e-6, atol=1e-6)  # M=1: a gemv
    assert run_as(q, "scaled_mm", torch.zeros(0, 96)).shape == (0, 64)


@pytest.mark.parametrize("seed", range(4))
def test_scaled_mm_error_bound(seed):
    lin, q = fp8_layer(seed=seed)
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        ys, yd, yf = run_as(q, "scaled_mm", x), run_as(q, "dequant", x), lin(x)
    b = lin.bias
    w_hat = q.dequantize(torch.float32)
    xs = quant.fp8_rows(x)[1]
    bound = (FP8_HALF_ULP * x.norm() + FP8_SUBNORMAL * xs.norm() * math.sqrt(96)) * torch.linalg.matrix_norm(w_hat, 2)
    assert (ys - yd).norm() <= bound * (1 + 1e-4)  # for every input (the derivation above)
    vs_dequant, vs_float = rel_l2(ys - b, yd - b), rel_l2(ys - b, yf - b)
    print(f"seed {seed}: scaled vs dequantized {vs_dequant:.4f} (< {FP8_RMS:.4f}), vs unquantized fp32 "
          f"{vs_float:.4f} (< {math.sqrt(2) * FP8_RMS:.4f}); rigorous bound used {(ys - yd).norm() / bound:.2f}")
    assert 0 < vs_dequant < FP8_RMS
    assert vs_dequant < vs_float < math.sqrt(2) * FP8_RMS

    # bf16 compute: the unquantized bf16 linear against the scaled path (bf16 output)
    lin16, q16 = fp8_layer(dtype=torch.bfloat16, seed=seed)
    with torch.no_grad():
        ys16, yf16 = run_as(q16, "scaled_mm", x), lin16(x)
    assert ys16.dtype == torch.bfloat16
    b16 = lin16.bias.float()
    err = rel_l2(ys16.float() - b16, yf16.float() - b16)
    print(f"seed {seed}: bf16 compute, scaled vs unquantized bf16 {err:.4f}")
    assert err < math.sqrt(2) * FP8_RMS + BF16_SLACK


def per_tensor_reference(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """What one scale for the whole activation would give (the counterfactual the per-token test rules out)."""
    s = x.abs().max() / 448
    xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    wq, ws = ref_quant(lin.weight, "fp8")
    return xq @ (wq.float() * ws).T + lin.bias


def test_activation_scales_are_per_token():
    """A row 1e3 or 1e5 times larger leaves every other row's output bit for bit as it was. e4m3 spans
    2^-9 .. 448 (2^17.8), so under a per-tensor scale a 1e3x outlier still leaves the others in the normal
    range (their error stays 0.026, only their bits change); at 1e5 they fall to subnormals and zero
    (measured: 0.29 per tensor vs 0.025 per token)."""
    lin, q = fp8_layer(k=64)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    base = run_as(q, "scaled_mm", x)
    b = lin.bias
    for factor in (1e3, 1e5):
        x2 = x.clone()
        x2[0] *= factor
        out = run_as(q, "scaled_mm", x2)
        assert torch.equal(out[1:], base[1:])
        per_tensor = per_tensor_reference(lin, x2)
        assert not torch.equal(per_tensor[1:], per_tensor_reference(lin, x)[1:])  # what a per-tensor scale does
        with torch.no_grad():
            ref = lin(x2)
        ours, theirs = rel_l2(out[1:] - b, ref[1:] - b), rel_l2(per_tensor[1:] - b, ref[1:] - b)
        print(f"outlier x{factor:g}: other rows' error per token {ours:.4f}, per tensor {theirs:.4f}")
        assert ours < math.sqrt(2) * FP8_RMS
        assert rel_l2(out[:1] - b, ref[:1] - b) < math.sqrt(2) * FP8_RMS  # the outlier row itself too
    assert theirs > 0.2  # at 1e5 a per-tensor scale would fail the bound above


def fp8_layers_of(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def test_modes_on_cpu_and_int8_untouched():
    model = quantize_dit(tiny_dit(TINY_T2V), "fp8")
    layers = fp8_layers_of(model)
    assert fp8_compute_mode(model) == "dequant"  # the default: today's path
    assert set_fp8_compute(model, "auto", "cpu") == "dequant"  # auto: scaled GEMMs on fp8 GPUs only
    assert set_fp8_compute(model, "scaled_mm", "cpu") == "scaled_mm"  # CPU runs them when asked (slowly)
    assert all(m.fp8_compute == "scaled_mm" for m in layers) and len(layers) == 20
    # not state: the state dict, .to() and the 8-bit weights are as before; the mode survives .to()
    keys = sorted(quantized_state_dict(model))
    model.to(torch.bfloat16)
    assert sorted(quantized_state_dict(model)) == keys and fp8_compute_mode(model) == "scaled_mm"
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32 for m in layers)
    assert set_fp8_compute(model, "dequant", "cpu") == "dequant"
    with pytest.raises(ConfigError, match="dit_fp8_compute = 'fast': choose from auto, scaled_mm, dequant"):
        set_fp8_compute(model, "fast", "cpu")

    int8 = quantize_dit(tiny_dit(TINY_T2V), "int8")
    assert set_fp8_compute(int8, "auto", "cpu") is None and fp8_compute_mode(int8) is None
    assert all(m.fp8_compute == "dequant" for m in fp8_layers_of(int8))  # int8 stays weight-only
    with pytest.raises(ConfigError, match="no fp8 layers"):
        set_fp8_compute(int8, "scaled_mm", "cpu")
    with pytest.raises(ConfigError, match="dit_fp8_compute = 'scaled_mm': needs fp8 weights"):
        load_run_config({"dit_quantized": True, "dit_quant_scheme": "int8-vllm", "dit_fp8_compute": "scaled_mm"})


@pytest.mark.parametrize("name,capability,auto", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), "dequant"),
    ("NVIDIA L40S", (8, 9), "scaled_mm"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "scaled_mm"),
], ids=["sm80", "sm89", "sm90"])
def test_modes_on_simulated_gpus(monkeypatch, name, capability, auto):
    monkeypatch.setattr(quant, "cuda_capability", lambda device: (name, capability))
    model = quantize_dit(tiny_dit(TINY_T2V), "fp8")  # stays on CPU: only the mode choice is simulated
    assert set_fp8_compute(model, "auto", "cuda") == auto
    if auto == "dequant":
        with pytest.raises(ConfigError, match=rf"{name} has compute capability 8\.0; fp8 GEMMs need 8\.9"):
            set_fp8_compute(model, "scaled_mm", "cuda:0")
        assert fp8_compute_mode(model) == "dequant"
    else:
        assert set_fp8_compute(model, "scaled_mm", torch.device("cuda", 0)) == "scaled_mm"


def test_misaligned_layers_and_missing_scaled_mm(monkeypatch):
    """CUDA's kernel takes in/out features in multiples of 16: "auto" leaves another layer on dequant and
    says so; "scaled_mm" names the layer and leaves the model as it was. CPU has no such rule."""
    monkeypatch.setattr(quant, "cuda_capability", lambda device: ("NVIDIA H100 80GB HBM3", (9, 0)))
    model = torch.nn.Sequential(QuantLinear(48, 48, scheme="fp8"), QuantLinear(48, 40, scheme="fp8"),
                                QuantLinear(40, 48, scheme="int8"))
    mixed = set_fp8_compute(model, "auto", "cuda")
    assert mixed == fp8_compute_mode(model) == ("mixed: 1 of 2 fp8 layers on scaled_mm; dequantized (in/out "
                                                "features not multiples of 16): 1")
    assert [m.fp8_compute for m in model] == ["scaled_mm", "dequant", "dequant"]
    with pytest.raises(ConfigError, match=r"layer 1: out_features = 40: not a multiple of 16"):
        set_fp8_compute(model, "scaled_mm", "cuda")
    assert fp8_compute_mode(model) == mixed
    assert set_fp8_compute(model, "scaled_mm", "cpu") == "scaled_mm"
    assert model(torch.randn(3, 48)).shape == (3, 48)

    monkeypatch.delattr(torch, "_scaled_mm")
    with pytest.raises(ConfigError, match=r"has no torch\._scaled_mm; use 'auto' or 'dequant'"):
        set_fp8_compute(model, "scaled_mm", "cpu")
    assert set_fp8_compute(model, "auto", "cuda") == "dequant"


def test_loader_sets_fp8_compute(tmp_path, monkeypatch):
    arch = TINY_I2V
    model = tiny_dit(arch)
    write_official_dit(tmp_path, model)
    folder = ModelFolder.open(tmp_path)

    def load(mode, device="cpu"):
        cfg = load_run_config({"dit_quantized": True, "dit_quant_scheme": "fp8-sgl", "dit_fp8_compute": mode},
                              task="i2v")
        return load_pipeline_dit(folder, cfg, torch.float32, device)

    scaled, dequant = load("scaled_mm"), load("dequant")
    assert fp8_compute_mode(scaled) == "scaled_mm" and fp8_compute_mode(dequant) == "dequant"
    assert all(m.fp8_compute == "scaled_mm" for m in fp8_layers_of(scaled))
    assert fp8_compute_mode(load("auto")) == "dequant"  # CPU
    kw = dit_inputs(arch)
    with torch.no_grad():
        out, expect, ref = scaled(**kw), dequant(**kw), model(**kw)
    err = rel_l2(out, expect)
    print(f"DiT output, scaled fp8 GEMMs vs dequantized: rel-L2 {err:.3e} (bound {DIT_SCALED_BOUND:.0e}); "
          f"vs fp32 {rel_l2(out, ref):.3e}")
    assert 0 < err < DIT_SCALED_BOUND and rel_l2(out, ref) < REL_BOUND["fp8"]

    # a pre-quantized file through load_quantized_dit: same layers, same output
    path = tmp_path / "fp8.safetensors"
    save_file(quantized_state_dict(dequant), str(path))
    pre = load_quantized_dit(path, arch, "fp8-sgl", torch.float32, "cpu", fp8_compute="scaled_mm")
    assert fp8_compute_mode(pre) == "scaled_mm"
    with torch.no_grad():
        assert torch.equal(pre(**kw), out)

    # "scaled_mm" on a GPU without fp8 tensor cores fails before any weight is read
    monkeypatch.setattr(quant, "cuda_capability", lambda device: ("NVIDIA A100-SXM4-80GB", (8, 0)))
    monkeypatch.setattr("model.loader.read_weights", lambda *a: pytest.fail("weights read before the check"))
    with pytest.raises(ConfigError, match="A100-SXM4-80GB has compute capability 8.0"):
        load("scaled_mm", "cuda")
    with pytest.raises(ConfigError, match="A100-SXM4-80GB has compute capability 8.0"):
        load_quantized_dit(path, arch, "fp8", torch.float32, "cuda", fp8_compute="scaled_mm")


CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)")
def test_scaled_mm_on_gpu():
    """On the GPU: "auto" picks the scaled GEMM; against the unquantized bf16 linear the error is within the
    bound derived above (plus bf16 rounding); a tiny DiT in bf16 agrees with the dequantized path."""
    lin, _ = fp8_layer(k=1024, n=2048, dtype=torch.bfloat16)
    lin = lin.cuda()
    q = QuantLinear.from_linear(lin, "fp8")
    assert set_fp8_compute(q, "auto", "cuda") == "scaled_mm"
    x = torch.randn(3, 77, 1024, device="cuda", dtype=torch.bfloat16)  # 231 tokens: not a multiple of 16
    with torch.no_grad():
        ys, yd, yf = run_as(q, "scaled_mm", x), run_as(q, "dequant", x), lin(x)
    b = lin.bias.float()
    vs_float = rel_l2(ys.float() - b, yf.float() - b)
    vs_dequant = rel_l2(ys.float() - b, yd.float() - b)
    print(f"GPU {torch.cuda.get_device_name()}: scaled vs unquantized bf16 {vs_float:.4f}, vs dequant {vs_dequant:.4f}")
    assert ys.dtype == torch.bfloat16 and ys.shape == (3, 77, 2048)
    assert vs_dequant < FP8_RMS + BF16_SLACK and vs_float < math.sqrt(2) * FP8_RMS + BF16_SLACK

    model = quantize_dit(tiny_dit(TINY_T2V), "fp8").to("cuda", torch.bfloat16)
    kw = {k: v.cuda() for k, v in dit_inputs(TINY_T2V).items()}
    with torch.no_grad():
        expect = model(**kw).float()
        assert set_fp8_compute(model, "auto", "cuda") == "scaled_mm"
        out = model(**kw).float()
    assert rel_l2(out, expect) < DIT_SCALED_BOUND + 3e-2  # bf16 activations on top of the CPU fp32 bound
