"""The DiT against diffusers' independent implementation, and the official 14B key set."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from helpers import dit_inputs, tiny_dit

from model.archs import TINY_I2V, TINY_T2V, WAN21_I2V_14B, WAN21_T2V_1_3B, WAN21_T2V_14B, DiTArch
from model.checkpoint import to_diffusers_dit
from model.dit import WanModel, apply_rope, rope_freqs, rope_table

TOL = 1e-5


def diffusers_reference(model: WanModel) -> WanTransformer3DModel:
    cfg = {k: v for k, v in model.arch.to_diffusers_config().items() if not k.startswith("_") and k != "text_len"}
    ref = WanTransformer3DModel(**cfg).eval()
    missing, unexpected = ref.load_state_dict(to_diffusers_dit(model.state_dict()), strict=True)
    assert not missing and not unexpected
    return ref


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_forward_equals_diffusers(arch, batch):
    """batch 1 takes the modulation into the layer norms' affine (modulated_norm); batch 2 the addcmul path."""
    model = tiny_dit(arch)
    ref = diffusers_reference(model)
    kw = dit_inputs(arch, batch=batch)
    ctx = F.pad(kw["context"], (0, 0, 0, arch.text_len - kw["context"].shape[1]))  # diffusers takes padded text
    with torch.no_grad():
        ours = model(**kw)
        hidden = torch.cat([kw["x"], kw["y"]], 1) if arch.is_i2v else kw["x"]
        theirs = ref(hidden, kw["t"], ctx, encoder_hidden_states_image=kw.get("clip_fea"), return_dict=False)[0]
    assert ours.shape == kw["x"].shape
    diff = (ours - theirs).abs().max().item()
    print(f"{arch.model_type}: max |ours - diffusers| = {diff:.2e} (output max {ours.abs().max():.2f})")
    assert diff <= TOL


def test_per_frame_timesteps_equal_diffusers():
    """Distinct timesteps per frame (per-token modulation) against diffusers' per-token timesteps [B, L]."""
    model = tiny_dit(TINY_T2V)
    ref = diffusers_reference(model)
    kw = dit_inputs(TINY_T2V, batch=1)
    t = torch.tensor([[999.0, 437.5, 10.0]])
    tokens_per_frame = (kw["x"].shape[3] // 2) * (kw["x"].shape[4] // 2)
    ctx = F.pad(kw["context"], (0, 0, 0, TINY_T2V.text_len - kw["context"].shape[1]))
    with torch.no_grad():
        ours = model(**dict(kw, t=t))
        theirs = ref(kw["x"], t.repeat_interleave(tokens_per_frame, 1), ctx, return_dict=False)[0]
    assert (ours - theirs).abs().max().item() <= TOL


def test_per_frame_timesteps_equal_uniform():
    """t [B, F] with equal entries is the same model call as t [B] (the CausVid path uses [B, F])."""
    model = tiny_dit(TINY_T2V)
    kw = dit_inputs(TINY_T2V)
    with torch.no_grad():
        a = model(**kw)
        kw2 = dict(kw, t=kw["t"][:, None].expand(-1, kw["x"].shape[2]).contiguous())
        b = model(**kw2)
    assert (a - b).abs().max().item() <= 1e-6


def test_per_frame_timesteps_condition_each_frame():
    """A different t on frame 0 changes the output (frames attend to each other, so all frames move)."""
    model = tiny_dit(TINY_T2V)
    kw = dit_inputs(TINY_T2V, batch=1)
    t = torch.full((1, 3), 500.0)
    with torch.no_grad():
        a = model(**dict(kw, t=t))
        t2 = t.clone()
        t2[0, 0] = 0.0
        b = model(**dict(kw, t=t2))
    assert (a - b).abs().amax(dim=(0, 1, 3, 4))[0] > 1e-3


def official_rope(x: torch.Tensor, grid: tuple[int, int, int], frame_offset: int = 0) -> torch.Tensor:
    """Upstream wan/modules/model.py rope_params + rope_apply, written out again: complex128 rotations of the
    (time, height, width) bands, x in float64."""
    b, seq, n, d = x.shape
    c = d // 2

    def params(dim):  # rope_params(1024, dim)
        angles = torch.outer(torch.arange(1024, dtype=torch.float64),
                             1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)))
        return torch.polar(torch.ones_like(angles), angles)

    freqs = torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    rot = torch.cat([ft[frame_offset:frame_offset + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                     fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                     fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(seq, 1, -1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, seq, n, -1, 2))
    return torch.view_as_real(xc * rot).flatten(3)


@pytest.mark.parametrize("frame_offset", [0, 2, 1000])
def test_rope_equals_official_complex128(frame_offset):
    """fp32 cos/sin rotation of random q/k (release head_dim 128) = upstream's float64 complex path within 1e-5,
    also at a CausVid frame offset near the table's end."""
    d, grid = 128, (3, 4, 5)
    tables = rope_table(d)
    freqs = rope_freqs(tables, grid, frame_offset)
    assert freqs.dtype == torch.float32 and freqs.shape == (math.prod(grid), 2, d)
    g = torch.Generator().manual_seed(frame_offset)
    for _ in range(2):  # q, k
        x = torch.randn(2, math.prod(grid), 3, d, generator=g) * 3
        y = apply_rope(x, freqs)
        assert y.dtype == torch.float32
        assert (y.double() - official_rope(x, grid, frame_offset)).abs().max().item() <= TOL
    xb = torch.randn(1, math.prod(grid), 2, d, generator=g).bfloat16()
    yb = apply_rope(xb, freqs)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.double(), official_rope(xb, grid, frame_offset), rtol=2 ** -7, atol=1e-2)


def test_rope_tables_are_the_documented_angles():
    """Channel pair j of a head rotates by the documented angle: time, height, width bands of 22/21/21 (d=128);
    rows: (cos, cos) and (-sin, sin) per pair."""
    d = 128
    grid = (3, 4, 5)
    freqs = rope_freqs(rope_table(d), grid, frame_offset=2)
    f_i, h_i, w_i = 1, 2, 3
    tok = (f_i * grid[1] + h_i) * grid[2] + w_i
    for j in (0, 21, 22, 42, 43, 63):
        if j < 22:
            angle = (f_i + 2) * 10000 ** (-2 * j / 44)
        elif j < 43:
            angle = h_i * 10000 ** (-2 * (j - 22) / 42)
        else:
            angle = w_i * 10000 ** (-2 * (j - 43) / 42)
        cos, sin = freqs[tok, 0, 2 * j].item(), freqs[tok, 1, 2 * j + 1].item()
        assert freqs[tok, 0, 2 * j + 1].item() == cos and freqs[tok, 1, 2 * j].item() == -sin
        assert math.isclose(cos, math.cos(angle), abs_tol=1e-7) and math.isclose(sin, math.sin(angle), abs_tol=1e-7)
    with pytest.raises(ValueError, match="RoPE covers 1024"):
        rope_freqs(rope_table(d), grid, frame_offset=1022)


def test_rope_gradient_equals_official():
    """The in-place pair update keeps autograd right (training runs through apply_rope)."""
    d, grid = 12, (2, 3, 2)
    freqs = rope_freqs(rope_table(d), grid)
    x = torch.randn(1, math.prod(grid), 2, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, math.prod(grid), 2, d, dtype=torch.float64)
    (g,) = torch.autograd.grad((apply_rope(x, freqs) * w).sum(), x)
    (ref,) = torch.autograd.grad((official_rope(x, grid) * w).sum(), x)
    assert (g - ref).abs().max().item() <= TOL


def test_grad_path_equals_inference_path():
    """Block.forward updates its own tensors in place only without autograd; both paths agree, and backward runs."""
    model = tiny_dit(TINY_T2V)
    kw = dit_inputs(TINY_T2V)
    with torch.no_grad():
        a = model(**kw)
    b = model(**kw)
    b.square().mean().backward()
    assert (a - b.detach()).abs().max().item() <= 1e-6
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_inputs_raise_clear_errors():
    model = tiny_dit(TINY_T2V)
    kw = dit_inputs(TINY_T2V)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(**dict(kw, x=torch.randn(2, 4, 3, 9, 12)))
    with pytest.raises(ValueError, match=r"\[B, 4, F, H, W\]"):
        model(**dict(kw, x=torch.randn(2, 5, 3, 8, 12)))
    with pytest.raises(ValueError, match="context must be"):
        model(**dict(kw, context=torch.randn(2, 17, 32)))
    i2v = tiny_dit(TINY_I2V)
    kw = dit_inputs(TINY_I2V)
    with pytest.raises(ValueError, match="needs y"):
        i2v(**dict(kw, y=None))


# --- the official 14B / 1.3B layout, built on the meta device ----------------------------------------
def documented_keys(arch: DiTArch) -> dict[str, tuple[int, ...]]:
    """Key -> shape as listed in the Wan2.1 release (shared/reference/wan_xdit.md §1.2), written out by hand."""
    d, f = arch.dim, arch.ffn_dim
    keys = {
        "patch_embedding.weight": (d, arch.in_dim, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (64, d), "head.head.bias": (64,),
    }
    for n in range(arch.num_layers):
        b = f"blocks.{n}."
        keys[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                keys[f"{b}{attn}.{p}.weight"] = (d, d)
                keys[f"{b}{attn}.{p}.bias"] = (d,)
            keys[f"{b}{attn}.norm_q.weight"] = (d,)
            keys[f"{b}{attn}.norm_k.weight"] = (d,)
        keys[b + "norm3.weight"] = (d,)
        keys[b + "norm3.bias"] = (d,)
        keys[b + "ffn.0.weight"], keys[b + "ffn.0.bias"] = (f, d), (f,)
        keys[b + "ffn.2.weight"], keys[b + "ffn.2.bias"] = (d, f), (d,)
        if arch.is_i2v:
            for p in ("k_img", "v_img"):
                keys[f"{b}cross_attn.{p}.weight"] = (d, d)
                keys[f"{b}cross_attn.{p}.bias"] = (d,)
            keys[b + "cross_attn.norm_k_img.weight"] = (d,)
    if arch.is_i2v:
        keys.update({
            "img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
            "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
            "img_emb.proj.3.weight": (d, 1280), "img_emb.proj.3.bias": (d,),
            "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
        })
    return keys


@pytest.mark.parametrize("name,arch,billions", [
    ("T2V-14B", WAN21_T2V_14B, 14.289), ("I2V-14B", WAN21_I2V_14B, 16.395), ("T2V-1.3B", WAN21_T2V_1_3B, 1.419),
])
def test_release_architectures_on_meta(name, arch, billions):
    with torch.device("meta"):
        model = WanModel(arch)
    sd = model.state_dict()
    expected = documented_keys(arch)
    assert set(sd) == set(expected), (sorted(set(sd) ^ set(expected)))[:10]
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    per_block = sum(1 for k in sd if k.startswith("blocks.0."))
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {len(sd)} tensors ({per_block} per block), {count:,} parameters")
    assert per_block == (32 if arch.is_i2v else 27)
    assert abs(count / 1e9 - billions) < 1e-3  # the reference rounds to 3 decimals


def test_tiny_key_counts():
    """Upstream's tiny 2-layer models have 69 (t2v) and 87 (i2v) tensors."""
    assert len(WanModel(TINY_T2V).state_dict()) == 69
    assert len(WanModel(TINY_I2V).state_dict()) == 87
