"""Weight-only int8/fp8 DiT linears (model/quant.py) and LightX2V's pre-quantized file layout.

References in this file are computed independently of model/quant.py: the per-row formulas, the float8
e4m3 grid enumerated from its 256 bit patterns, and a re-statement of LightX2V's converter rule
(`tools/convert/converter.py`, wan_dit: every 2-D tensor under blocks.N.{self_attn,cross_attn,ffn}
becomes int8/fp8 + `<key>_scale` [out, 1]; everything else stays float in `non_linear_dtype`).
"""
import pytest
import torch
from helpers import dit_inputs, tiny_dit
from safetensors.torch import save_file

from model.archs import TINY_I2V, TINY_T2V, WAN21_I2V_14B, WAN21_T2V_14B
from model.checkpoint import CheckpointError, save_sharded
from model.config import QUANT_SCHEMES
from model.dit import Linear, WanModel
from model.loader import load_quantized_dit
from model.quant import QuantLinear, normalize_scheme, quantize_dit, quantized_state_dict, weight_bytes

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
