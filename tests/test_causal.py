"""CausVid: the cached block forward equals the masked full-sequence forward; fragments, windows, sessions.

Every test runs the tiny model of configs/tiny/causvid_t2v.json (blocks of 2 latent frames, 3 blocks per
fragment, 6 tokens per frame, the 9-step CausVid list) on CPU in fp32.
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_dit, torch_threads

from model.archs import TINY_I2V, TINY_T2V
from model.causal import KVCache, block_causal_mask
from model.causal_pipeline import CausVidPipeline
from model.checkpoint import CheckpointError
from model.config import ConfigError, load_run_config
from model.pipeline import Cancelled, RequestError
from model.schedulers import StepDistillScheduler, make_sampler
from model.tiny import write_tiny_model

ROOT = Path(__file__).parent.parent
TINY_CFG = ROOT / "configs" / "tiny" / "causvid_t2v.json"
WORDS = "a red blue square circle moving left right".split()
PROMPT, OTHER = "a red square moving left", "a blue circle moving right"


def cfg_for(**over):
    return load_run_config({**json.loads(TINY_CFG.read_text()), **over}, model_cls="wan2.1_causvid")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (tens of seconds on a busy 2-core box)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("causvid"), "t2v", words=WORDS, causal=tiny_dit(TINY_T2V, seed=21))


@pytest.fixture(scope="module")
def base(root):
    return CausVidPipeline.from_pretrained(root, cfg_for())


def pipe_with(base, **over):
    """The same loaded model under other config values (cheap: no reload)."""
    return CausVidPipeline(base.dit, base.text_encoder, base.vae, cfg_for(**over), base.device)


# --------------------------------------------------------------------------------------------------
# The model side
# --------------------------------------------------------------------------------------------------
def test_block_causal_mask_is_the_cache_visibility():
    m = block_causal_mask(6, 2)
    want = torch.tensor([[j < (i // 2 + 1) * 2 for j in range(6)] for i in range(6)])
    assert torch.equal(m, want)
    # window 4 with a 1-frame sink: the block ending at frame 6 sees frame 0 (sink) and frames 3, 4, 5
    m = block_causal_mask(6, 2, window=4, sink=1)
    assert m[4].tolist() == [True, False, False, True, True, True]
    assert m[0].tolist() == [True, True, False, False, False, False]


def test_cache_ring_keeps_sink_and_latest_frames():
    c = KVCache(num_layers=1, window=5, sink=2)
    seen = []
    for start in range(0, 12, 2):
        c.begin(start, 2)
        c.begin(start, 2)  # a further step of the same block: same slots
        seen.append({c.slot(f) for f in range(start + 2)})
        frames = [f for f in range(start + 2) if f < 2 or f >= start + 2 - 3]
        assert sorted(c.slot(f) for f in frames) == list(range(c.held))  # exactly the held slots, no collision
    assert c.held == 5 and c.first_frame == 9
    with pytest.raises(ValueError, match="blocks must come in order"):
        c.begin(20, 2)


@pytest.mark.parametrize("over", [{}, {"attention_window": 4, "sink_frames": 2, "rope_positions": "absolute"},
                                  {"attention_window": 3}, {"fragment_continuation": "last_block"}],
                         ids=["all-frames", "window4-sink2", "window3", "lightx2v-last-block"])
def test_cached_blocks_equal_masked_full_sequence(base, over):
    """Every block forward of a 2-fragment session (each denoising step) equals the full-sequence forward
    under the block-causal mask fed the same noisy block after the clean latents of every earlier position."""
    pipe = pipe_with(base, **over)
    causal = pipe.causal
    inner = causal.forward_block
    clean = {}  # RoPE position -> clean latents [1, z, 1, h, w] as the cache holds them
    checked = []
    ctx = pipe.encode_prompt(PROMPT)

    def recording(x, t, frame_start, cache, ctx_kv, output=True):
        out = inner(x, t, frame_start, cache, ctx_kv, output)
        f = x.shape[2]
        if float(t[0]) == 0:  # the clean pass: these latents are now the context of later blocks
            for j in range(f):
                clean[frame_start + j] = x[:, :, j:j + 1].clone()
            return out
        seq = torch.cat([clean[p] for p in range(frame_start)] + [x], dim=2)
        ts = torch.cat([torch.zeros(frame_start), torch.full((f,), float(t[0]))])[None]
        with torch.no_grad():
            ref = causal.forward_full(seq, ts, ctx)[:, :, frame_start:]
        checked.append((frame_start, (out - ref).abs().max().item()))
        return out

    causal.forward_block = recording
    session = pipe.start_session(PROMPT, seed=5, history=True)
    session.next_fragment()
    session.next_fragment()
    steps = len(pipe.sampler)
    assert len(checked) == steps * (pipe.fragment_blocks(0) + pipe.fragment_blocks(1))
    assert max(d for _, d in checked) <= 1e-5
    assert max(p for p, _ in checked) == (4 if over.get("fragment_continuation") == "last_block" else 10)
    if "fragment_continuation" not in over:  # the cache-filling pass ran on each block's clean result
        assert all(torch.equal(clean[p][0, :, 0], session.latents()[:, p]) for p in range(12))


def test_first_block_follows_the_causvid_loop(base):
    """Block 0 by hand: noise from the seed, x0 = x - σ·v with σ = t/1000, fresh noise from seed + 1 between
    steps (CausVid's inference loop), the flow from the full-sequence forward of that block alone."""
    session = base.start_session(PROMPT, seed=17, history=True)
    session.next_fragment()
    noise_gen, step_gen = torch.Generator().manual_seed(17), torch.Generator().manual_seed(18)
    x = torch.randn((1, 4, 2, 4, 6), generator=noise_gen)
    ts = [999, 934, 862, 756, 603, 410, 250, 140, 74]
    ctx = base.encode_prompt(PROMPT)
    with torch.no_grad():
        for i, t in enumerate(ts):
            v = base.causal.forward_full(x, torch.full((1, 2), float(t)), ctx)
            x0 = x - t / 1000 * v
            if i + 1 < len(ts):
                s = ts[i + 1] / 1000
                x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=step_gen)
    assert (x0[0] - session.latents()[:, :2]).abs().max().item() <= 1e-5


def test_causvid_sampler_follows_the_reference_lists():
    s = make_sampler(cfg_for())
    assert s.denoising_step_list == [999, 934, 862, 756, 603, 410, 250, 140, 74]
    assert s.timesteps.tolist() == [999.0, 934.0, 862.0, 756.0, 603.0, 410.0, 250.0, 140.0, 74.0]  # unwarped
    assert s.sigmas.tolist() == pytest.approx([0.999, 0.934, 0.862, 0.756, 0.603, 0.41, 0.25, 0.14, 0.074, 0.0])
    assert s.renoise == "fresh_noise"
    warped = make_sampler(cfg_for(warp_denoising_step=True, renoise="deterministic"))
    u = 0.934
    assert warped.timesteps[1].item() == pytest.approx(1000 * 8 * u / (1 + 7 * u)) and warped.renoise == "deterministic"
    assert StepDistillScheduler([1000, 500], 5.0, warp=False).timesteps.tolist() == [1000.0, 500.0]


# --------------------------------------------------------------------------------------------------
# Fragments and streaming
# --------------------------------------------------------------------------------------------------
def test_fragment_continuation_matches_one_call(base):
    whole = base.generate(PROMPT, seed=9)  # num_fragments 2 from the config
    assert whole.latents.shape == (4, 12, 4, 6) and whole.video.shape == (3, 45, 32, 48)
    assert whole.nfe == 2 * 3 * (9 + 1)  # per block: 9 steps + the clean cache pass
    session = base.start_session(PROMPT, seed=9, history=True)
    first = session.next_fragment()
    second = session.next_fragment()
    assert first.shape[1] == 21 and second.shape[1] == 24  # 1 + 4*5, then 4*6 video frames
    assert torch.equal(second, whole.video[:, 21:]) and torch.equal(session.latents(), whole.latents)
    assert session.fragments == 2 and session.frames == 45 and session.latent_frames == 12
    assert np.array_equal(session.video(), np.concatenate([_u8(first), _u8(second)]))
    # LightX2V's continuation: the second fragment adds num_blocks - 1 blocks after re-using the last one
    lx = pipe_with(base, fragment_continuation="last_block").generate(PROMPT, seed=9)
    assert lx.latents.shape[1] == 6 + 4 and torch.equal(lx.latents[:, :6], whole.latents[:, :6])
    assert not torch.equal(lx.latents[:, 6:10], whole.latents[:, 6:10])


def _u8(video):
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def test_blocks_stream_as_they_finish(base):
    session = base.start_session(PROMPT, seed=2)
    got, events = [], []
    out = session.next_fragment(on_block=got.append, progress=events.append)
    assert [b.block for b in got] == [0, 1, 2] and [b.video.shape[1] for b in got] == [5, 8, 8]
    assert [b.frame_start for b in got] == [0, 5, 13] and [b.latent_start for b in got] == [0, 2, 4]
    assert torch.equal(torch.cat([b.video for b in got], dim=1), out)
    dit = [e.step for e in events if e.stage == "dit"]
    assert dit == list(range(1, 31)) and events[0].stage == "text"
    assert [e.step for e in events if e.stage == "vae"] == [1, 2, 3]
    assert 0 < session.timings["first_block"] <= session.timings["total"]


def test_new_prompt_resets_only_the_cross_attention_cache(base):
    base = pipe_with(base, prompt_switch="keep")
    a = base.start_session(PROMPT, seed=4)
    a.next_fragment()
    kv_before = [t.clone() for layer in a.cache.layers for t in layer.view()]
    ctx_before = a._ctx_kv
    b = base.restore_session(a.state_dict())
    a.set_prompt(OTHER)
    assert a._ctx_kv is None and all(torch.equal(x, y) for x, y in
                                     zip(kv_before, [t for layer in a.cache.layers for t in layer.view()]))
    changed = a.next_fragment()
    assert a._ctx_kv is not ctx_before
    same = b.next_fragment()
    assert not torch.equal(changed, same)
    # a third session given the new prompt at the call equals the first
    c = base.start_session(PROMPT, seed=4)
    c.next_fragment()
    assert torch.equal(c.next_fragment(prompt=OTHER), changed)


# --------------------------------------------------------------------------------------------------
# Bounded memory
# --------------------------------------------------------------------------------------------------
def test_window_bounds_the_cache_and_keeps_the_sink(base):
    pipe = pipe_with(base, attention_window=4, sink_frames=2, rope_positions="absolute")
    session = pipe.start_session(PROMPT, seed=6)
    sizes, sinks, held = [], [], []

    def watch(_block):
        layer = session.cache.layers[0]
        sizes.append(session.cache.nbytes())
        sinks.append(layer.k[:, :2 * layer.frame_tokens].clone())
        held.append(session.cache.held)

    for _ in range(3):
        session.next_fragment(on_block=watch)
    assert len(set(sizes)) == 1  # allocated once for the window; never grows
    assert held == [2, 4, 4, 4, 4, 4, 4, 4, 4]
    assert all(torch.equal(s, sinks[0]) for s in sinks)  # the first block's K/V survive every eviction
    unbounded = base.start_session(PROMPT, seed=6)
    grow = []
    for _ in range(3):
        unbounded.next_fragment()
        grow.append(unbounded.cache.nbytes())
    assert grow[0] < grow[1] < grow[2] and grow[2] == 3 * grow[0]
    assert sizes[0] * 6 == grow[0] * 4  # 4 frames kept instead of a fragment's 6


def test_window_covering_everything_changes_nothing(base):
    wide = pipe_with(base, attention_window=12).generate(PROMPT, seed=8)
    assert torch.equal(wide.latents, base.generate(PROMPT, seed=8).latents)
    narrow = pipe_with(base, attention_window=4).generate(PROMPT, seed=8)
    assert torch.equal(narrow.latents[:, :4], wide.latents[:, :4])  # identical until the first eviction
    assert not torch.equal(narrow.latents, wide.latents)


# --------------------------------------------------------------------------------------------------
# Sessions: offload, cancel, state
# --------------------------------------------------------------------------------------------------
def test_offload_and_back_gives_identical_next_fragment(root):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = CausVidPipeline.from_pretrained(root, cfg_for(), device=device, dtype=torch.float32)
    ref = pipe.start_session(PROMPT, seed=3)
    ref.next_fragment()
    moved = pipe.start_session(PROMPT, seed=3)
    moved.next_fragment()
    moved.to("cpu")
    assert moved.device == torch.device("cpu") and moved.cache_bytes() == ref.cache_bytes()
    moved.to(device)
    assert torch.equal(moved.next_fragment(), ref.next_fragment())
    stray = pipe.start_session(PROMPT, seed=3).to("meta")
    with pytest.raises(RuntimeError, match="move them back"):
        stray.next_fragment()


def test_cancel_then_resume_gives_the_uninterrupted_video(base):
    whole = base.generate(PROMPT, seed=11)
    session = base.start_session(PROMPT, seed=11, history=True)
    session.next_fragment()
    steps = []
    with pytest.raises(Cancelled):  # inside the second block of fragment 2
        session.next_fragment(progress=lambda p: steps.append(p) if p.stage == "dit" else None,
                              cancel=lambda: len(steps) >= 14)
    assert session.fragments == 1 and session.blocks == 4  # the finished block stays
    rest = session.next_fragment()
    assert rest.shape[1] == 16 and session.fragments == 2  # the two blocks left
    assert torch.equal(session.latents(), whole.latents)
    assert np.array_equal(session.video(), _u8(whole.video))


@pytest.mark.parametrize("over", [{}, {"attention_window": 4, "sink_frames": 2},
                                  {"fragment_continuation": "last_block"}],
                         ids=["all-frames", "window", "lightx2v-last-block"])
def test_state_dict_restore_rebuilds_the_session(base, over):
    pipe = pipe_with(base, **over)
    live = pipe.start_session(PROMPT, seed=13)
    live.next_fragment()
    live.next_fragment(prompt=OTHER)
    buf = io.BytesIO()
    torch.save(live.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    back = pipe.restore_session(state)
    assert (back.fragments, back.frames, back.prompt, back.blocks) == (2, live.frames, OTHER, live.blocks)
    if over.get("fragment_continuation") != "last_block":  # the rebuilt cache is the same, bit for bit
        for a, b in zip(live.cache.layers, back.cache.layers):
            assert all(torch.equal(x, y) for x, y in zip(a.view(), b.view()))
    assert torch.equal(back.next_fragment(), live.next_fragment())
    assert torch.equal(back.next_fragment(prompt=PROMPT), live.next_fragment(prompt=PROMPT))


def test_restore_mid_fragment_and_refuse_other_settings(base):
    live = base.start_session(PROMPT, seed=14)
    calls = []
    with pytest.raises(Cancelled):
        live.next_fragment(on_block=calls.append, cancel=lambda: len(calls) >= 1)
    back = base.restore_session(live.state_dict())
    assert back.blocks == 1 and back.fragments == 0
    assert torch.equal(back.next_fragment(), live.next_fragment())
    with pytest.raises(ValueError, match="attention_window"):
        pipe_with(base, attention_window=4).restore_session(live.state_dict())
    with pytest.raises(ValueError, match="not a CausVid session state"):
        base.restore_session({"latents": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# Configs, loading and bad input
# --------------------------------------------------------------------------------------------------
def test_configs_load_as_causvid():
    tiny = cfg_for()
    tiny.check_arch(TINY_T2V)
    assert (tiny.num_fragments, tiny.num_frames, tiny.frame_seq_length, tiny.fragment_continuation) == (2, 6, 6, "cache")
    real = load_run_config(ROOT / "configs" / "wan21" / "wan_t2v_causvid.json", model_cls="wan2.1_causvid")
    assert real.model_cls == "wan2.1_causvid" and real.num_frames == 21 and real.frame_seq_length == 1560
    assert make_sampler(real).timesteps[-1].item() == 74.0


def test_causal_weights_load_from_pt_and_missing_file_is_named(base, tmp_path):
    root = write_tiny_model(tmp_path / "m", "t2v", words=WORDS)
    with pytest.raises(CheckpointError, match="causvid_models/causal_model.safetensors"):
        CausVidPipeline.from_pretrained(root, cfg_for())
    (root / "causvid_models").mkdir()
    sd = {f"model.{k}": v for k, v in base.dit.state_dict().items()}  # a CausVid/Self-Forcing training file
    torch.save({"generator": sd}, root / "causvid_models" / "causal_model.pt")
    pipe = CausVidPipeline.from_pretrained(root, cfg_for())
    assert all(torch.equal(a, b) for a, b in zip(pipe.dit.state_dict().values(), base.dit.state_dict().values()))


@pytest.mark.parametrize("over,match", [
    ({"task": "i2v"}, "text-to-video only"),
    ({"num_blocks": 4}, "num_frames = 6: must equal num_frame_per_block\\*num_blocks \\(2\\*4\\)"),
    ({"target_video_length": 81}, "target_video_length = 81: is 21 latent frames.*set target_video_length = 21"),
    ({"sink_frames": 2}, "sink_frames = 2: needs attention_window"),
    ({"attention_window": 3, "sink_frames": 2}, "attention_window = 3: must hold the sink and the block"),
    ({"frame_seq_length": 7}, "frame_seq_length = 7: must equal tokens per latent frame at 32x48 = 6"),
    ({"parallel": {"seq_p_size": 2, "cfg_p_size": 2}}, "cfg_p_size = 2: CausVid runs without CFG"),
    ({"parallel": {"seq_p_size": 2, "dit_fsdp": True}}, "dit_fsdp with CausVid is not supported"),
])
def test_bad_configs_are_refused(base, over, match):
    with pytest.raises(ConfigError, match=match):
        CausVidPipeline(base.dit, base.text_encoder, base.vae, cfg_for(**over))


def test_bad_requests_are_refused(base, monkeypatch):
    with pytest.raises(ConfigError, match="text-to-video only"):  # an I2V DiT
        CausVidPipeline(tiny_dit(TINY_I2V), base.text_encoder, base.vae, cfg_for())
    with pytest.raises(RequestError, match="frame_seq_length = 6: must equal tokens per latent frame at 64x48 = 12"):
        base.start_session(PROMPT, height=64)
    with pytest.raises(RequestError, match="prompt must not be empty"):
        base.start_session(" ")
    with pytest.raises(RequestError, match="beyond RoPE's 1024 positions"):
        base.generate(PROMPT, num_fragments=171)
    monkeypatch.setattr("model.causal_session.ROPE_MAX_POSITIONS", 10)  # a session reaching the table's end
    session = base.start_session(PROMPT, seed=1)
    session.next_fragment()
    with pytest.raises(RequestError, match="would need frames up to 12, beyond RoPE's 10 positions"):
        session.next_fragment()
    assert session.blocks == 3  # refused before any work
    with pytest.raises(ValueError, match="RoPE covers frames"):
        base.causal.forward_block(torch.zeros(1, 4, 2, 4, 6), torch.zeros(1), 1023, base.causal.new_cache(), [])


def test_prompt_schedule_switches_between_fragments(base):
    """One call with prompts and durations equals a session switched by hand (each switch re-cached)."""
    from model.causal_pipeline import fragment_prompts

    sched = base.generate(PROMPT, seed=19, prompt_schedule=[(PROMPT, 1), {"prompt": OTHER, "fragments": 2}])
    by_hand = base.start_session(PROMPT, seed=19)
    parts = [by_hand.next_fragment(), by_hand.next_fragment(prompt=OTHER), by_hand.next_fragment()]
    assert torch.equal(sched.video, torch.cat(parts, dim=1)) and sched.latents.shape[1] == 18
    assert fragment_prompts(PROMPT, None, 2) == [PROMPT, PROMPT]
    for bad, says in [([(OTHER, 1)], "first prompt"), ([(PROMPT, 0)], "integer >= 1"), ([[PROMPT]], "prompt_schedule"),
                      ([(PROMPT, 2)], "covers 2 fragments")]:
        with pytest.raises(RequestError, match=says):
            fragment_prompts(PROMPT, bad, 3 if says.startswith("covers") else None)
