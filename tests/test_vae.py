"""Wan VAE glue (model/vae.py): key conversion, both folder layouts, chunked causal encode/decode, streaming.

Official key names and shapes are built here from upstream `wan/modules/vae.py`'s structure (reference
wan_xdit.md §3), independently of the converter under test.
"""
from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from model.archs import VaeArch
from model.checkpoint import VAE_FILE, CheckpointError, ModelFolder
from model.config import ConfigError
from model.vae import (
    StreamDecoder,
    WanVAE,
    arch_from_diffusers_config,
    convert_vae_official,
    decoder_history,
    vae_config,
    vae_key,
)

TINY = VaeArch(base_dim=8, z_dim=4, latents_mean=(0.3, -0.5, 1.2, 0.0), latents_std=(2.0, 0.5, 1.5, 3.0))


# --------------------------------------------------------------------------------------------------
# Official names and shapes, as upstream WanVAE_ (Encoder3d / Decoder3d) builds them
# --------------------------------------------------------------------------------------------------
def official_vae_shapes(a: VaeArch) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, *k), (cout,)

    def res(name, cin, cout):  # ResidualBlock: residual = [RMS, SiLU, conv, RMS, SiLU, Dropout, conv]
        s[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{name}.residual.2", cout, cin, (3, 3, 3))
        s[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{name}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{name}.shortcut", cout, cin, (1, 1, 1))

    def middle(name, c):  # [Res, Attn, Res]
        res(f"{name}.0", c, c)
        s[f"{name}.1.norm.gamma"] = (c, 1, 1)
        conv(f"{name}.1.to_qkv", 3 * c, c, (1, 1))
        conv(f"{name}.1.proj", c, c, (1, 1))
        res(f"{name}.2", c, c)

    z, stages = a.z_dim, len(a.dim_mult)
    dims = [a.base_dim * m for m in (1, *a.dim_mult)]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    i = 0
    for st, (cin, cout) in enumerate(itertools.pairwise(dims)):
        for _ in range(a.num_res_blocks):
            res(f"encoder.downsamples.{i}", cin, cout)
            cin, i = cout, i + 1
        if st < stages - 1:  # Resample: ZeroPad2d + Conv2d(stride 2) [+ time_conv]
            conv(f"encoder.downsamples.{i}.resample.1", cout, cout, (3, 3))
            if a.temporal_downsample[st]:
                conv(f"encoder.downsamples.{i}.time_conv", cout, cout, (3, 1, 1))
            i += 1
    middle("encoder.middle", dims[-1])
    s["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z, dims[-1], (3, 3, 3))
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))

    dims = [a.base_dim * m for m in (a.dim_mult[-1], *reversed(a.dim_mult))]
    up = list(reversed(a.temporal_downsample))
    conv("decoder.conv1", dims[0], z, (3, 3, 3))
    middle("decoder.middle", dims[0])
    i = 0
    for st, (cin, cout) in enumerate(itertools.pairwise(dims)):
        if st > 0:  # upstream: `if i == 1 or i == 2 or i == 3: in_dim = in_dim // 2`
            cin //= 2
        for _ in range(a.num_res_blocks + 1):
            res(f"decoder.upsamples.{i}", cin, cout)
            cin, i = cout, i + 1
        if st < stages - 1:  # Resample: Upsample + Conv2d(dim, dim//2) [+ time_conv(dim, 2 dim)]
            conv(f"decoder.upsamples.{i}.resample.1", cout // 2, cout, (3, 3))
            if up[st]:
                conv(f"decoder.upsamples.{i}.time_conv", 2 * cout, cout, (3, 1, 1))
            i += 1
    s["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return s


def expand(pattern: str) -> list[str]:
    """'a.{0,1}.b.{x,y}' -> the 4 names (the reference's brace notation)."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


RES = "residual.{0,3}.gamma residual.{2,6}.{weight,bias}"
MID = [f"{{encoder,decoder}}.middle.{{0,2}}.{r}" for r in RES.split()] + [
    "{encoder,decoder}.middle.1.norm.gamma", "{encoder,decoder}.middle.1.{to_qkv,proj}.{weight,bias}"]
REFERENCE_KEYS = [  # wan_xdit.md §3 "VAE keys [verified list, 194]"
    "encoder.conv1.{weight,bias}",
    *[f"encoder.downsamples.{{0,1,3,4,6,7,9,10}}.{r}" for r in RES.split()],
    "encoder.downsamples.{3,6}.shortcut.{weight,bias}",
    "encoder.downsamples.{2,5,8}.resample.1.{weight,bias}",
    "encoder.downsamples.{5,8}.time_conv.{weight,bias}",
    *MID,
    "{encoder,decoder}.head.0.gamma", "{encoder,decoder}.head.2.{weight,bias}",
    "conv{1,2}.{weight,bias}",
    "decoder.conv1.{weight,bias}",
    *[f"decoder.upsamples.{{0,1,2,4,5,6,8,9,10,12,13,14}}.{r}" for r in RES.split()],
    "decoder.upsamples.4.shortcut.{weight,bias}",
    "decoder.upsamples.{3,7,11}.resample.1.{weight,bias}",
    "decoder.upsamples.{3,7}.time_conv.{weight,bias}",
]
REFERENCE_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def meta_diffusers_shapes(arch: VaeArch) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoencoderKLWan(**vae_config(arch))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_real_size_keys_on_meta():
    official = official_vae_shapes(VaeArch())
    reference = [k for p in REFERENCE_KEYS for k in expand(p)]
    print(f"official Wan2.1_VAE keys: {len(official)}, reference list: {len(reference)}")
    assert len(reference) == len(set(reference)) == 194
    assert set(official) == set(reference)
    assert {k: official[k] for k in REFERENCE_SHAPES} == REFERENCE_SHAPES
    assert sum(math.prod(s) for s in official.values()) == 126_892_531  # "126.9 M params"

    meta = {k: torch.empty(s, device="meta") for k, s in official.items()}
    ours = {k: tuple(v.shape) for k, v in convert_vae_official(meta).items()}
    assert ours == meta_diffusers_shapes(VaeArch())  # exactly the default AutoencoderKLWan keys and shapes
    theirs = convert_wan_vae_to_diffusers(meta)
    assert {k: id(v) for k, v in convert_vae_official(meta).items()} == {k: id(v) for k, v in theirs.items()}
    assert all(vae_key(vae_key(k), to_diffusers=False) == k for k in official)  # the inverse


@pytest.mark.parametrize("nrb", [1, 3])
def test_converter_other_num_res_blocks(nrb):
    arch = TINY.model_copy(update={"num_res_blocks": nrb})
    official = official_vae_shapes(arch)
    meta = {k: torch.empty(s, device="meta") for k, s in official.items()}
    converted = {k: tuple(v.shape) for k, v in convert_vae_official(meta, nrb).items()}
    assert converted == meta_diffusers_shapes(arch)
    # diffusers' converter hard-codes num_res_blocks=2 block indices: why we have our own
    assert set(convert_wan_vae_to_diffusers(meta)) != set(converted)


def test_unsupported_structures():
    with pytest.raises(ConfigError, match="attn_scales"):
        vae_config(TINY.model_copy(update={"attn_scales": (1.0,)}))
    with pytest.raises(ConfigError, match="4 stages, 2 of them temporal"):
        vae_config(TINY.model_copy(update={"dim_mult": (1, 2, 4), "temporal_downsample": (True, True)}))
    with pytest.raises(ConfigError, match="is_residual"):
        arch_from_diffusers_config({**vae_config(TINY), "is_residual": True})
    assert arch_from_diffusers_config({**vae_config(TINY), "_class_name": "AutoencoderKLWan"}) == TINY


# --------------------------------------------------------------------------------------------------
# Tiny random VAE in both folder layouts
# --------------------------------------------------------------------------------------------------
def random_official_sd(arch: VaeArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random; convs ~ 1/sqrt(fan_in) so activations stay O(1); norm gammas around 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_vae_shapes(arch).items():
        x = torch.randn(shape, generator=g)
        if k.endswith("gamma"):
            x = 1 + 0.1 * x
        elif k.endswith("bias"):
            x = 0.05 * x
        else:
            x = x / math.sqrt(math.prod(shape[1:]))
        sd[k] = x
    return sd


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    sd = random_official_sd(TINY)
    official = tmp_path_factory.mktemp("official")
    torch.save(sd, official / VAE_FILE)
    diffusers = tmp_path_factory.mktemp("diffusers")
    (diffusers / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with torch.device("meta"):
        model = AutoencoderKLWan(**vae_config(TINY))
    model.load_state_dict(convert_vae_official(sd), strict=True, assign=True)
    model.save_pretrained(diffusers / "vae")  # diffusers' own writer: vae/config.json + safetensors
    return official, diffusers


@pytest.fixture(scope="module")
def vae(folders):
    return WanVAE.load(ModelFolder.open(folders[0]), TINY)


def video(b=1, t=9, h=32, w=32, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_both_layouts_identical(folders, vae):
    official, diffusers = (ModelFolder.open(f) for f in folders)
    assert (official.layout, diffusers.layout) == ("official", "diffusers")
    dvae = WanVAE.load(diffusers, None)  # architecture from vae/config.json
    assert dvae.model.config.latents_std == list(TINY.latents_std)
    x = video(b=2)
    z = vae.encode(x)
    assert torch.equal(z, dvae.encode(x))
    assert torch.equal(vae.decode(z), dvae.decode(z))


def test_encode_decode_normalization(vae):
    x = video(b=2, t=9)
    z = vae.encode(x)
    assert z.shape == (2, 4, 3, 4, 4) and z.dtype == torch.float32
    mean = torch.tensor(TINY.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(TINY.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        mu = vae.model.encode(x).latent_dist.mean
        assert mu.shape == (2, 4, 3, 4, 4)
        assert torch.allclose(z, (mu - mean) / std, atol=1e-6)
        out = vae.decode(z)
        assert out.shape == (2, 3, 9, 32, 32) and out.dtype == torch.float32
        ref = vae.model.decode(z * std + mean).sample
    diff = (out - ref).abs().max().item()
    print(f"decode vs diffusers decode(z*std+mean): max |diff| = {diff:.2e}")
    assert diff <= 1e-6
    assert out.abs().max() <= 1 and (out.abs() < 1).float().mean() > 0.5  # clamped, mostly not saturated


def test_encode_is_causal(vae):
    x = video(t=9, seed=3)
    z9, z5, z1 = vae.encode(x), vae.encode(x[:, :, :5]), vae.encode(x[:, :, :1])
    assert (z5.shape[2], z1.shape[2]) == (2, 1)
    diff = (z9[:, :, :2] - z5).abs().max().item()
    print(f"encode(first 5 frames) vs encode(9)[:2]: max |diff| = {diff:.2e}")
    assert diff <= 1e-5
    assert (z9[:, :, :1] - z1).abs().max() <= 1e-5
    assert vae.decode(z1).shape == (1, 3, 1, 32, 32)


def test_stream_decode_equals_whole(vae):
    z = torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    whole = vae.decode(z)
    assert whole.shape == (1, 3, 21, 32, 32)
    dec = vae.stream_decoder()
    a = dec.decode(z[:, :, 0:3])
    vae.decode(z[:, :, 1:4])  # a whole decode in between must not disturb the stream's cache
    b = dec.decode(z[:, :, 3:6])
    assert (a.shape[2], b.shape[2], dec.latent_frames) == (9, 12, 6)
    diff = (torch.cat([a, b], 2) - whole).abs().max().item()
    print(f"stream decode [0:3]+[3:6] vs whole [0:6]: max |diff| = {diff:.2e}")
    assert diff <= 1e-6
    dec = vae.stream_decoder()  # uneven chunks
    parts = [dec.decode(z[:, :, s]) for s in (slice(0, 1), slice(1, 2), slice(2, 6))]
    assert (torch.cat(parts, 2) - whole).abs().max() <= 1e-6


# --------------------------------------------------------------------------------------------------
# Resuming a stream decoder from its last R latent frames
# --------------------------------------------------------------------------------------------------
def random_decoder(arch: VaeArch, seed: int = 0):
    """The decoder of `arch` with random weights, nothing else materialized (the real size is 70 M params)."""
    with torch.device("meta"):
        decoder = AutoencoderKLWan(**vae_config(arch)).decoder
    decoder.to_empty(device="cpu").requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, p in decoder.named_parameters():
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("gamma") else
                torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return decoder


def taint_depth(decoder, start: int = 3) -> int:
    """R measured: latent frames decoded from a NaN one on until the feature cache is NaN-free again.

    NaN survives every op it meets (0 * NaN included), so it marks exactly the cache entries that depend on
    that frame; 1x1 latents keep it cheap (space does not matter, time does).
    """
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(start + 100):
            x = torch.full((1, decoder.z_dim, 1, 1, 1), math.nan) if i == start else \
                torch.randn(1, decoder.z_dim, 1, 1, 1, generator=g)
            decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
            if i >= start and not any(isinstance(c, torch.Tensor) and c.isnan().any() for c in cache):
                return i - start
    raise AssertionError("the cache never forgot the NaN frame")


@pytest.mark.parametrize("arch", [TINY.model_copy(update={"num_res_blocks": n}) for n in (1, 2, 3)] + [VaeArch()],
                         ids=["tiny-nrb1", "tiny-nrb2", "tiny-nrb3", "wan2.1-release"])
def test_history_frames(arch):
    decoder = random_decoder(arch)
    r = decoder_history(decoder)
    if arch == VaeArch():
        print(f"Wan2.1 release VAE: the stream decoder's state is a function of the last R = {r} latent frames")
    assert r == taint_depth(decoder) == 8 * arch.num_res_blocks + 22


def test_history_frames_of_fixture(vae):
    dec = vae.stream_decoder()
    assert dec.history_frames == 38
    dec.decode(torch.zeros(1, 4, 1, 2, 2))  # after frame 0 the temporal upsamples' slots hold "Rep": resume's
    reps = [i for i, c in enumerate(dec.feat_cache) if isinstance(c, str)]  # slots: conv_in, mid, 3 resnets
    assert reps == [1 + 4 + 6, 1 + 4 + 6 + 1 + 6] and {dec.feat_cache[i] for i in reps} == {"Rep"}


def next_chunks(dec: StreamDecoder, z: torch.Tensor, start: int) -> list[torch.Tensor]:
    return [dec.decode(z[:, :, s:s + 3]) for s in range(start, z.shape[2], 3)]


def same_cache(a: StreamDecoder, b: StreamDecoder) -> bool:
    return len(a.feat_cache) == len(b.feat_cache) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a.feat_cache, b.feat_cache, strict=True))


@pytest.mark.parametrize("n, start", [(38 + 5, 5), (38 + 5, 2), (10, 0)], ids=["tail-R", "tail-R+3", "short-stream"])
def test_resume_bit_exact(vae, n, start):
    """Resumed from frames [start, n), the decoder continues exactly as the one that decoded [0, n)."""
    z = torch.randn(1, 4, n + 6, 2, 2, generator=torch.Generator().manual_seed(7))
    ref = vae.stream_decoder()
    for s in range(0, n, 3):
        ref.decode(z[:, :, s:min(s + 3, n)])
    dec = vae.stream_decoder()
    dec.decode(torch.randn(1, 4, 4, 3, 3))  # resume replaces whatever state it had
    assert dec.resume(z[:, :, start:n], start) is dec
    assert dec.latent_frames == ref.latent_frames == n and same_cache(dec, ref)
    for a, b in zip(next_chunks(dec, z, n), next_chunks(ref, z, n), strict=True):
        assert a.shape == (1, 3, 12, 16, 16) and torch.equal(a, b)


def test_resume_needs_r_frames(vae):
    r, n = 38, 38 + 5
    z = torch.randn(1, 4, n + 3, 2, 2, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=r"depends on the last 38 latent frames \[5, 43\); got 37 \(from 6\)"):
        vae.stream_decoder().resume(z[:, :, n - r + 1:n], n - r + 1)
    with pytest.raises(ValueError, match=r"last 10 latent frames \[0, 10\); got 8"):  # short of frame 0
        vae.stream_decoder().resume(z[:, :, 2:10], 2)
    with pytest.raises(ValueError, match="tail must be"):
        vae.stream_decoder().resume(z[0], 0)
    ref = vae.stream_decoder()
    ref.decode(z[:, :, :n])
    expected = ref.decode(z[:, :, n:])
    short = vae.stream_decoder()
    short.history_frames = r - 1  # R - 1 frames is not enough: it differs
    short.resume(z[:, :, n - r + 1:n], n - r + 1)
    assert not same_cache(short, ref)
    diff = (short.decode(z[:, :, n:]) - expected).abs().max().item()
    print(f"resumed from R - 1 = {r - 1} frames: next chunk off by max |diff| = {diff:.2e}")
    assert diff > 0


def test_bf16_load(folders):
    v = WanVAE.load(ModelFolder.open(folders[0]), TINY, dtype=torch.bfloat16)
    assert v.dtype == torch.bfloat16 and v.device.type == "cpu"
    z = v.encode(video(t=5))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 2, 4, 4)
    assert v.decode(z).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, rule", [
    ((1, 3, 8, 32, 32), "4n\\+1"),
    ((1, 3, 5, 36, 32), "multiples of 8"),
    ((1, 3, 5, 32, 20), "multiples of 8"),
    ((1, 4, 5, 32, 32), "\\[B, 3, T, H, W\\]"),
    ((3, 5, 32, 32), "\\[B, 3, T, H, W\\]"),
])
def test_bad_video(vae, shape, rule):
    with pytest.raises(ValueError, match=rule):
        vae.encode(torch.zeros(shape))


def test_bad_latents(vae):
    with pytest.raises(ValueError, match="latents must be \\[B, 4, F, h, w\\]"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="latents must be"):
        vae.stream_decoder().decode(torch.zeros(4, 2, 4, 4))
    dec = vae.stream_decoder()
    dec.decode(torch.zeros(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="one stream decoder per video"):
        dec.decode(torch.zeros(1, 4, 1, 4, 6))


def test_bad_official_weights(tmp_path):
    sd = random_official_sd(TINY)
    sd["decoder.upsamples.4.shortcut.weight"] = torch.zeros(1, 2, 1, 1, 1)
    del sd["encoder.middle.1.proj.bias"]
    torch.save(sd, tmp_path / VAE_FILE)
    with pytest.raises(CheckpointError) as e:
        WanVAE.load(ModelFolder.open(tmp_path), TINY)
    msg = str(e.value)
    assert "shape mismatch for decoder.upsamples.4.shortcut.weight" in msg and "(1, 2, 1, 1, 1)" in msg
    assert "missing keys" in msg and "encoder.middle.1.proj.bias" in msg and VAE_FILE in msg
    good = tmp_path / "good"
    good.mkdir()
    torch.save(random_official_sd(TINY), good / VAE_FILE)
    with pytest.raises(CheckpointError, match="shape mismatch for decoder.conv1.weight"):  # wrong arch
        WanVAE.load(ModelFolder.open(good), TINY.model_copy(update={"base_dim": 16}))


def test_bad_diffusers_weights(tmp_path, folders):
    from safetensors.torch import load_file, save_file

    root = tmp_path / "d"
    (root / "vae").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    src = folders[1] / "vae"
    (root / "vae" / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    del sd["decoder.up_blocks.1.upsamplers.0.time_conv.bias"]
    save_file(sd, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.up_blocks.1.upsamplers.0.time_conv.bias"):
        WanVAE.load(ModelFolder.open(root), None)
