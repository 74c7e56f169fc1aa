"""TAEHV / TinyDecoder (model/tae.py) and the `tae` training stage's pieces.

The release layout (key names and shapes of madebyollin/taehv's `taew2_1.pth`, latent_channels 16) is written
out here by hand from taehv.py's `TAEHV.__init__` (encoder / decoder `nn.Sequential`s, MemBlock = conv.0 /
conv.2 / conv.4 with an Identity skip, bias-free TPool / TGrow / stage convs), independently of the module
under test; the decode is checked against a plain per-frame traversal (taehv.py's sequential path).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError
from model.tae import (
    TAEHV,
    MemBlock,
    TGrow,
    TinyDecoder,
    TPool,
    arch_from_state_dict,
    build_tae,
    decoder_history,
    layout_shapes,
    save_tae,
    upsample_conv,
)

RELEASE_SHAPES = {  # taew2_1.pth, read off taehv.py (n_f = 256, 128, 64, 64; encoder 64 wide)
    "decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,),
    "decoder.3.conv.0.weight": (256, 512, 3, 3), "decoder.3.conv.0.bias": (256,),
    "decoder.3.conv.2.weight": (256, 256, 3, 3), "decoder.5.conv.4.weight": (256, 256, 3, 3),
    "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
    "decoder.8.weight": (128, 256, 3, 3),
    "decoder.9.conv.0.weight": (128, 256, 3, 3), "decoder.11.conv.4.bias": (128,),
    "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
    "decoder.14.weight": (64, 128, 3, 3),
    "decoder.15.conv.0.weight": (64, 128, 3, 3), "decoder.17.conv.4.bias": (64,),
    "decoder.19.conv.weight": (128, 64, 1, 1),
    "decoder.20.weight": (64, 64, 3, 3),
    "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,),
    "encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,),
    "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool stride 2
    "encoder.3.weight": (64, 64, 3, 3),  # stride-2 conv, no bias
    "encoder.4.conv.0.weight": (64, 128, 3, 3),
    "encoder.7.conv.weight": (64, 128, 1, 1),
    "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool stride 1
    "encoder.16.conv.4.bias": (64,),
    "encoder.17.weight": (16, 64, 3, 3), "encoder.17.bias": (16,),
}
ABSENT = ("decoder.7.conv.bias", "decoder.8.bias", "decoder.20.bias", "encoder.3.bias", "encoder.2.conv.bias",
          "decoder.3.skip.weight", "decoder.0.weight", "decoder.21.weight")
# 18 MemBlocks x 6 + decoder convs 1, 22 (w+b) + 3 stage convs + 3 TGrows; encoder alike: 64 + 64
RELEASE_KEYS = 128
DEMO = (12, 8, 6, 4)  # a narrow decoder, like the demo model's


def random_tae(z=4, channels=DEMO, encoder=False, seed=0, scale=1.0) -> TAEHV:
    torch.manual_seed(seed)
    tae = TAEHV(z, channels, encoder=encoder)
    with torch.no_grad():
        for p in tae.parameters():
            p.mul_(scale)
        tae.decoder[22].bias.fill_(0.5)  # mid-range output, so the range checks see both sides
    return tae.eval()


# --------------------------------------------------------------------------------------------------
# Layout and loading
# --------------------------------------------------------------------------------------------------
def test_release_layout_key_names_and_shapes():
    sd = layout_shapes()
    assert len(sd) == RELEASE_KEYS
    assert sum(k.startswith("decoder.") for k in sd) == 64 and sum(k.startswith("encoder.") for k in sd) == 64
    for k, shape in RELEASE_SHAPES.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    for k in ABSENT:
        assert k not in sd, k
    mem = [k for k in sd if re.fullmatch(r"(en|de)coder\.\d+\.conv\.[024]\.(weight|bias)", k)]
    assert len(mem) == 18 * 6
    assert {int(k.split(".")[1]) for k in mem if k.startswith("decoder.")} == {3, 4, 5, 9, 10, 11, 15, 16, 17}
    assert {int(k.split(".")[1]) for k in mem if k.startswith("encoder.")} == {4, 5, 6, 9, 10, 11, 14, 15, 16}


def test_arch_inferred_from_shapes():
    assert arch_from_state_dict(layout_shapes()) == {"latent_channels": 16, "channels": (256, 128, 64, 64),
                                                     "encoder": True, "encoder_width": 64}
    assert arch_from_state_dict(layout_shapes(8, DEMO, encoder=False)) == {"latent_channels": 8, "channels": DEMO,
                                                                           "encoder": False}


def test_release_layout_loads_strict():
    sd = {k: torch.randn(v.shape, dtype=torch.float16) for k, v in layout_shapes().items()}
    tae = build_tae(sd)
    assert tae.encoder is not None and tae.channels == (256, 128, 64, 64)
    assert torch.equal(tae.decoder[7].conv.weight, sd["decoder.7.conv.weight"].float())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip_strict(tmp_path, suffix):
    tae = random_tae(encoder=True)
    path = save_tae(tae, tmp_path / f"tae{suffix}", dtype=torch.float16)
    tiny = TinyDecoder.load(path)
    assert tiny.tae.channels == DEMO and tiny.z_dim == 4 and tiny.tae.encoder is not None
    for k, v in tae.state_dict().items():
        assert torch.equal(tiny.tae.state_dict()[k], v.half().float()), k
    ref = TinyDecoder(build_tae({k: v.half() for k, v in tae.state_dict().items()}))
    z = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(tiny.decode(z), ref.decode(z))
    only = TinyDecoder.load(save_tae(tae, tmp_path / f"dec{suffix}", decoder_only=True))
    assert only.tae.encoder is None and torch.allclose(only.decode(z), TinyDecoder(tae).decode(z), atol=0)


def _file(tmp_path, sd):
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    return path


def test_missing_unexpected_and_wrong_shape_are_clear_errors(tmp_path):
    good = random_tae().state_dict()
    sd = dict(good)
    del sd["decoder.9.conv.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys.*decoder\.9\.conv\.2\.bias") as e:
        TinyDecoder.load(_file(tmp_path, sd))
    assert "bad.pth" in str(e.value)
    sd = {**good, "decoder.99.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys.*decoder\.99\.weight"):
        TinyDecoder.load(_file(tmp_path, sd))
    sd = {**good, "decoder.16.conv.0.weight": torch.zeros(6, 7, 3, 3)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for decoder\.16\.conv\.0\.weight: expected "
                                              r"\(6, 12, 3, 3\), found \(6, 7, 3, 3\)"):
        TinyDecoder.load(_file(tmp_path, sd))
    with pytest.raises(CheckpointError, match=r"decoder\.1\.weight.*missing"):
        TinyDecoder.load(_file(tmp_path, {"encoder.0.weight": torch.zeros(64, 3, 3, 3)}))


# --------------------------------------------------------------------------------------------------
# The decode contract
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 5])
def test_frame_count_shape_and_range(frames):
    tiny = TinyDecoder(random_tae(scale=3.0))
    y = tiny.decode(4 * torch.randn(2, 4, frames, 3, 5))
    assert y.shape == (2, 3, 1 + 4 * (frames - 1), 24, 40) and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1
    assert (y == -1).any() and (y == 1).any()  # it clamps both ends (scaled weights overshoot)
    with pytest.raises(ValueError, match=r"\[B, 4, F, h, w\]"):
        tiny.decode(torch.randn(1, 3, 2, 3, 3))


def test_output_range_maps_tae_unit_range():
    tae = random_tae()
    tiny = TinyDecoder(tae)
    z = torch.randn(1, 4, 3, 2, 2)
    ref = tae.decode_video(z.transpose(1, 2)).transpose(1, 2) * 2 - 1
    assert torch.allclose(tiny.decode(z), ref, atol=1e-6)


def test_latent_space_raw_denormalizes():
    tae = random_tae()
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 3.0]
    z = torch.randn(1, 4, 2, 3, 3)
    raw = TinyDecoder(tae, mean, std, latent_space="raw").decode(z)
    m, s = torch.tensor(mean).view(1, 4, 1, 1, 1), torch.tensor(std).view(1, 4, 1, 1, 1)
    assert torch.allclose(raw, TinyDecoder(tae).decode(z * s + m), atol=1e-6)
    assert torch.equal(TinyDecoder(tae, mean, std).decode(z), TinyDecoder(tae).decode(z))  # normalized: as is
    with pytest.raises(ValueError, match="latents_mean"):
        TinyDecoder(tae, latent_space="raw")
    with pytest.raises(ValueError, match="3 values"):
        TinyDecoder(tae, mean[:3], std)


@pytest.mark.parametrize("chunks", [(1, 2, 2), (2, 3), (1, 1, 1, 1, 1), (3, 1, 1), (5,)])
def test_stream_decode_equals_whole(chunks):
    tiny = TinyDecoder(random_tae(seed=1))
    z = torch.randn(2, 4, sum(chunks), 3, 4)
    whole = tiny.decode(z)
    stream, parts, at = tiny.stream_decoder(), [], 0
    for i, f in enumerate(chunks):
        part = stream.decode(z[:, :, at:at + f])
        assert part.shape[2] == (1 + 4 * (f - 1) if i == 0 else 4 * f)
        parts.append(part)
        at += f
    assert stream.latent_frames == sum(chunks)
    assert (torch.cat(parts, 2) - whole).abs().max() <= 1e-5
    one = tiny.stream_decoder()  # any chunking: the same bits (latent frames go through one at a time)
    assert torch.equal(torch.cat([one.decode(z[:, :, k:k + 1]) for k in range(sum(chunks))], 2), torch.cat(parts, 2))
    with pytest.raises(ValueError, match="one stream decoder per video"):
        stream.decode(torch.randn(1, 4, 1, 3, 4))


def positive_tae(z=4, channels=DEMO, seed=7) -> TAEHV:
    """Weights in [0, 2 / fan_in), zero biases: with positive latents every ReLU passes, so each output
    depends on every input in its causal cone (random weights let ReLUs and decay hide dependencies)."""
    torch.manual_seed(seed)
    tae = TAEHV(z, channels, encoder=False)
    with torch.no_grad():
        for name, p in tae.named_parameters():
            p.copy_(2 * torch.rand_like(p) / p[0].numel() if name.endswith("weight") else torch.zeros_like(p))
    return tae.eval()


def test_history_frames_walk_and_resume():
    hist = TinyDecoder(random_tae()).stream_decoder().history_frames
    assert hist == 8 and decoder_history(TAEHV(16, encoder=False).decoder) == 8  # 3 + 3 + 2 (stage 3 at 2x)
    tiny = TinyDecoder(positive_tae())
    z = torch.rand(1, 4, 14, 3, 3) + 0.1

    def state(zz):
        s = tiny.stream_decoder()
        s.decode(zz)
        return s.memory

    base = state(z[:, :, :12])  # after latent frame 11: depends on frames [11 - hist + 1, 11]
    for k, inside in ((11 - hist, False), (11 - hist + 1, True)):
        zz = z[:, :, :12].clone()
        zz[:, :, k] += 1.0
        diff = max((state(zz)[i] - base[i]).abs().max().item() for i in base)
        assert (diff > 0) == inside, (k, diff)
    tiny = TinyDecoder(random_tae(seed=6))
    whole = tiny.decode(z)
    s = tiny.stream_decoder().resume(z[:, :, 12 - hist:12], 12 - hist)
    assert s.latent_frames == 12
    cont = s.decode(z[:, :, 12:14])
    assert (cont - whole[:, :, 1 + 4 * 11:]).abs().max() <= 1e-5
    live = tiny.stream_decoder()
    live.decode(z[:, :, :5])
    live.decode(z[:, :, 5:12])
    assert torch.equal(live.decode(z[:, :, 12:14]), cont)  # bit for bit, as a session restore needs
    s = tiny.stream_decoder().resume(z[:, :, :3], 0)  # from the start: any length
    assert (s.decode(z[:, :, 3:5]) - whole[:, :, 1 + 4 * 2:1 + 4 * 4]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="depends on the last 8 latent frames"):
        tiny.stream_decoder().resume(z[:, :, 5:12], 5)


# --------------------------------------------------------------------------------------------------
# The math, independently: a per-frame traversal (taehv.py's sequential path) and MemBlock by hand
# --------------------------------------------------------------------------------------------------
def sequential(seq, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each frame [1, C, H, W] through seq depth first, in causal order: a MemBlock keeps its last input,
    a TGrow's frames each run the rest of the graph in turn, a TPool waits for `stride` frames."""
    memory: dict[int, object] = {}
    out = []

    def run(x, i):
        if i == len(seq):
            out.append(x)
            return
        b = seq[i]
        if isinstance(b, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            run(b(x, past), i + 1)
        elif isinstance(b, TGrow):
            for part in b.conv(x).chunk(b.stride, 1):
                run(part, i + 1)
        elif isinstance(b, TPool):
            memory.setdefault(i, []).append(x)
            if len(memory[i]) == b.stride:
                run(b.conv(torch.cat(memory.pop(i), 1)), i + 1)
        else:
            run(b(x), i + 1)

    for f in frames:
        run(f, 0)
    return out


def test_decode_matches_per_frame_traversal():
    tae = random_tae(seed=2)
    z = torch.randn(1, 3, 4, 3, 3)  # NTCHW, 3 latent frames
    with torch.no_grad():
        ref = torch.cat(sequential(tae.decoder, list(z[0].split(1))))[3:].clamp(0, 1)  # trim 3
        got = tae.decode_video(z)[0]
    assert got.shape == ref.shape == (9, 3, 24, 24)
    assert (got - ref).abs().max() <= 1e-5


def test_encode_matches_per_frame_traversal():
    tae = random_tae(encoder=True, seed=3)
    x = torch.rand(1, 9, 3, 16, 24)
    with torch.no_grad():
        got = tae.encode_video(x)
        padded = torch.cat([x[0], x[0, -1:].expand(3, -1, -1, -1)])  # 9 -> 12 frames, last one repeated
        ref = torch.cat(sequential(tae.encoder, list(padded.split(1))))
    assert got.shape == (1, 3, 4, 2, 3)
    assert (got[0] - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_upsample_conv_equals_upsample_then_conv(bias):
    torch.manual_seed(8)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    x = torch.randn(2, 5, 6, 9)
    with torch.no_grad():
        ref = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        assert (upsample_conv(conv, x) - ref).abs().max() <= 1e-5


def test_fast_decode_equals_module_by_module():
    tae = random_tae(seed=9)
    z = torch.randn(2, 4, 4, 3, 5)
    with torch.no_grad():
        for trim in (0, 3):
            mem_a, mem_b = {}, {}
            a = tae.decode_frames(z, mem_a, trim, fast=True)
            b = tae.decode_frames(z, mem_b, trim, fast=False)
            assert a.shape == b.shape == (2, 16 - trim, 3, 24, 40)
            assert (a - b).abs().max() <= 1e-5 and mem_a.keys() == mem_b.keys()
            assert all((mem_a[i] - mem_b[i]).abs().max() <= 1e-5 for i in mem_b)


def test_memblock_by_hand():
    torch.manual_seed(4)
    b = MemBlock(3, 3)
    x, past = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    c = b.conv
    h = F.relu(F.conv2d(torch.cat([x, past], 1), c[0].weight, c[0].bias, padding=1))
    h = F.relu(F.conv2d(h, c[2].weight, c[2].bias, padding=1))
    h = F.conv2d(h, c[4].weight, c[4].bias, padding=1)
    assert torch.allclose(b(x, past), F.relu(h + x), atol=1e-6)
    wide = MemBlock(3, 5)  # n_in != n_out: a bias-free 1x1 skip
    assert tuple(wide.skip.weight.shape) == (5, 3, 1, 1) and wide.skip.bias is None


# --------------------------------------------------------------------------------------------------
# The training stage's pieces (training/tae.py)
# --------------------------------------------------------------------------------------------------
def test_stage_loss_trains_and_cache_round_trip():
    from training.tae import dequantize, quantize, tae_loss
    y = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    assert (dequantize(quantize(y)) - y).abs().max() <= 1 / 127.5 / 2 + 1e-6
    torch.manual_seed(5)
    tae = TAEHV(4, (8, 8, 4, 4), encoder=False)
    z, target = torch.randn(2, 4, 2, 2, 2), torch.rand(2, 3, 5, 16, 16) * 2 - 1
    opt = torch.optim.Adam(tae.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, parts = tae_loss(tae, z, target, 0.1)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first and set(parts) == {"mse", "l1"}
