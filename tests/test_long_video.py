"""Long CausVid sessions (model/causal.py, model/causal_session.py): window-relative positions without an end, the
ring cache with a re-positioned sink, re-cache on a prompt switch, flat memory and a restore bounded by the window.

The tiny model of configs/tiny/causvid_t2v.json (blocks of 2 latent frames, 6 tokens per frame, 2 layers), on CPU
in fp32. The reference for positions is an independent cache written here: it keeps every key un-rotated in time,
copies the held frames into one tensor per block (the copy-based cache the ring replaces) and rotates them with
the literal window-relative positions (sink at 0..S-1, the window right after it), float64 attention.
"""
import pytest
import torch
from helpers import reference_attention, tiny_dit
from test_causal import OTHER, PROMPT, WORDS, cfg_for, one_thread, pipe_with  # noqa: F401 (one_thread: autouse)

from model.archs import TINY_T2V
from model.causal import KVCache, SlotKV
from model.causal_pipeline import CausVidPipeline
from model.config import ConfigError
from model.dit import ROPE_MAX_POSITIONS, apply_rope, time_shift
from model.pipeline import RequestError
from model.tiny import write_tiny_model

TOL = 1e-5  # fp32 against the float64 reference


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = write_tiny_model(tmp_path_factory.mktemp("long"), "t2v", words=WORDS, causal=tiny_dit(TINY_T2V, seed=23))
    return CausVidPipeline.from_pretrained(root, cfg_for())


# --------------------------------------------------------------------------------------------------
# The independent reference: literal window-relative positions over a copy-based cache
# --------------------------------------------------------------------------------------------------
class CopyLayer(SlotKV):
    """Per frame: keys rotated at temporal position 0 (spatial rotation kept), raw values."""

    def __init__(self, cache):
        super().__init__(cache)
        self.frames: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class CopyCache(KVCache):
    layer_cls = CopyLayer


def reference_attend(q, k, v, layer, kernel):
    c = layer.cache
    start, f = c.block
    ft = k.shape[1] // f
    d = k.shape[3]
    for i in range(f):  # un-rotate each frame's keys to temporal position 0
        rows = slice(i * ft, (i + 1) * ft)
        layer.frames[start + i] = (apply_rope(k[:, rows], time_shift(d, -(start + i))), v[:, rows].clone())
    held = [*range(min(c.sink, c.end)), *range(c.first_frame, c.end)] if c.window else list(range(c.end))
    for j in [j for j in layer.frames if j not in held]:  # evicted: gone from the copy
        del layer.frames[j]
    position = {j: n for n, j in enumerate(held)}  # sink 0..S-1, then the window: window-relative
    keys = torch.cat([apply_rope(layer.frames[j][0], time_shift(d, position[j])) for j in held], dim=1)
    values = torch.cat([layer.frames[j][1] for j in held], dim=1)
    query = apply_rope(q, time_shift(d, position[start] - start))  # the block's frames at their window positions
    return reference_attention(query, keys, values)[0].to(q.dtype)


def with_reference(pipe):
    pipe.causal.use_attention(reference_attend, lambda n, w, s, bf, pos: CopyCache(n, w, s, pos))
    return pipe


def run_blocks(pipe, fragments, seed=3, prompt=PROMPT):
    session = pipe.start_session(prompt, seed=seed, history=True)
    for _ in range(fragments):
        session.next_fragment()
    return session


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------
def test_relative_positions_equal_absolute_while_the_session_fits_the_window(base):
    window = dict(attention_window=12, sink_frames=2)
    rel = run_blocks(pipe_with(base, **window), 2).latents()
    absolute = run_blocks(pipe_with(base, **window, rope_positions="absolute"), 2).latents()
    assert (rel - absolute).abs().max().item() <= TOL
    assert (rel - run_blocks(base, 2).latents()).abs().max().item() <= TOL  # nothing evicted: as unwindowed


@pytest.mark.parametrize("sink", [0, 2])
def test_ring_cache_equals_the_copy_based_window_relative_reference(base, sink):
    """5 fragments (30 latent frames, the window 6 full after 3): every block as the reference computes it."""
    over = dict(attention_window=6, sink_frames=sink, denoising_step_list=[999, 603, 250])
    ours = run_blocks(pipe_with(base, **over), 5).latents()
    ref = run_blocks(with_reference(pipe_with(base, **over)), 5).latents()
    diff = (ours - ref).abs().max().item()
    print(f"sink {sink}: ring cache vs copy-based window-relative reference, max |diff| = {diff:.2e}")
    assert diff <= TOL
    if sink:  # the re-positioned sink is not the absolute one
        absolute = run_blocks(pipe_with(base, **over, rope_positions="absolute"), 5).latents()
        assert (absolute[:, 6:] - ours[:, 6:]).abs().max().item() > 1e-3


def test_a_windowed_session_runs_past_ropes_table(base):
    """1,040 latent frames (RoPE's table has 1,024): the last blocks still equal the reference (no decoder: the
    latents are the point)."""
    over = dict(attention_window=4, sink_frames=2, denoising_step_list=[999], num_blocks=26, num_frames=52,
                target_video_length=205)

    def denoiser(**cfg):
        return CausVidPipeline(base.dit, base.text_encoder, None, cfg_for(**cfg), base.device)

    n = 20
    ours = run_blocks(denoiser(**over), n)
    assert ours.latent_frames == 1040 > ROPE_MAX_POSITIONS and ours.cache.end == 1040
    ref = run_blocks(with_reference(denoiser(**over)), n).latents()
    assert (ours.latents()[:, -8:] - ref[:, -8:]).abs().max().item() <= TOL
    with pytest.raises(RequestError, match="beyond RoPE's 1024 positions"):  # no window: the real limit stays
        run_blocks(denoiser(**{k: v for k, v in over.items() if k not in ("attention_window", "sink_frames")}), n)


def test_sink_must_be_whole_blocks_for_relative_positions():
    with pytest.raises(ConfigError, match="multiple of num_frame_per_block"):
        cfg_for(attention_window=6, sink_frames=1)
    assert cfg_for(attention_window=6, sink_frames=1, rope_positions="absolute").sink_frames == 1


# --------------------------------------------------------------------------------------------------
# Prompt switch
# --------------------------------------------------------------------------------------------------
def test_recache_equals_a_fresh_cache_primed_under_the_new_prompt(base):
    pipe = pipe_with(base, attention_window=6, sink_frames=2)
    s = pipe.start_session(PROMPT, seed=8, history=True)
    s.next_fragment()
    s.next_fragment()
    lat = s.latents()
    noise, step = s._noise_gen.get_state(), s._step_gen.get_state()
    first = []
    s.next_fragment(prompt=OTHER, on_block=first.append)
    assert s.timings["recache"] > 0
    # by hand: the sink (frames 0-1) and the 2 frames before the next block's window (frames 10-11), primed at
    # positions 0.. under OTHER, then the next block denoised over them with the same generators
    causal, ctx = pipe.causal, pipe.causal.context_kv(pipe.encode_prompt(OTHER))
    cache = causal.new_cache()
    with torch.no_grad():
        for pos, frames in enumerate([slice(0, 2), slice(10, 12)]):
            causal.forward_block(lat[None, :, frames], torch.zeros(1), 2 * pos, cache, ctx, output=False)
        gen, sgen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        gen.set_state(noise)
        sgen.set_state(step)
        x = torch.randn((1, 4, 2, 4, 6), generator=gen)
        for i in range(len(pipe.sampler)):
            flow = causal.forward_block(x, pipe.sampler.timesteps[i].reshape(1), 4, cache, ctx)
            x = pipe.sampler.step(i, flow, x, generator=sgen)
    assert (x[0] - first[0].latents).abs().max().item() <= TOL
    kept = pipe_with(base, attention_window=6, sink_frames=2, prompt_switch="keep").start_session(PROMPT, seed=8)
    kept.next_fragment()
    kept.next_fragment()
    other = []
    kept.next_fragment(prompt=OTHER, on_block=other.append)
    assert (other[0].latents - first[0].latents).abs().max().item() > 1e-3  # the old K/V did matter


def test_batched_recache_equals_block_by_block(base):
    """Window 8 with a 2-frame sink: a switch re-caches the sink and the two blocks after it, those two in one
    forward (each block attending over its prefix); the next fragment equals the block-by-block re-cache's to
    float rounding, for one forward fewer."""
    pipe = pipe_with(base, attention_window=8, sink_frames=2)
    outs, nfe = [], []
    for batched in (True, False):
        s = pipe.start_session(PROMPT, seed=8)
        s.cache.batches = batched  # the ring cache's answer (parallel/causal.py): block by block
        s.next_fragment()
        before = s.nfe
        outs.append(s.next_fragment(prompt=OTHER))
        nfe.append(s.nfe - before)
        assert s._primed == ((2, 6) if batched else None) and s.timings["recache"] > 0
    assert nfe[0] == nfe[1] - 1
    assert (outs[0] - outs[1]).abs().max().item() <= TOL
    fresh = pipe.start_session(OTHER, seed=8)
    fresh.next_fragment()
    assert (outs[0] - fresh.next_fragment()).abs().max().item() > 1e-3  # the old video's latents did matter


def test_restore_after_a_batched_recache_is_bit_for_bit(base):
    """A state taken while the batch is in the cache's reach replays it as one forward (so the same bits), and
    one taken after it fell out of reach forgets it; either way the next fragment is the uninterrupted one."""
    pipe = pipe_with(base, attention_window=8, sink_frames=2, denoising_step_list=[999, 500])
    live = pipe.start_session(PROMPT, seed=4)
    live.next_fragment()
    live.next_fragment(prompt=OTHER)
    primed = []
    for k in range(4):
        state = live.state_dict()
        primed.append(state["primed"])
        prompt = PROMPT if k == 2 else None  # and a switch back from a restored session
        assert torch.equal(pipe.restore_session(state).next_fragment(prompt=prompt), live.next_fragment(prompt=prompt))
    assert primed[:2] == [[2, 6], [2, 6]] and primed[2] is None


# --------------------------------------------------------------------------------------------------
# Flat memory and a restore bounded by the window
# --------------------------------------------------------------------------------------------------
def test_session_memory_is_flat_and_restore_is_bounded_by_the_window(base):
    pipe = pipe_with(base, attention_window=4, sink_frames=2, denoising_step_list=[999, 500])
    live = pipe.start_session(PROMPT, seed=12)
    memory, states, replays = [], [], []
    for k in range(12):
        live.next_fragment(prompt=OTHER if k == 5 else None)
        memory.append(live.memory_bytes())
        state = live.state_dict()
        states.append(len(state["latents"]))
        if k in (7, 11):  # two lengths
            back = pipe.restore_session(state)
            replays.append(back.nfe)
            for a, b in zip(live.cache.layers, back.cache.layers):  # the rebuilt cache, bit for bit
                assert all(torch.equal(x, y) for x, y in zip(a.view(), b.view()))
            ahead = pipe.restore_session(state)
            assert torch.equal(ahead.next_fragment(), pipe.restore_session(state).next_fragment())
            if k == 7:
                follow = ahead
    # every entry flat once the decoder's 38-frame history is full (fragment 7 on)
    assert all(m == memory[6] for m in memory[6:]), memory
    assert len(set(states[6:])) == 1 and replays[0] == replays[1]  # independent of the video's length
    horizon = pipe.arch.num_layers * (4 - 2) + 2
    assert replays[0] <= (2 + horizon) // 2  # sink + horizon blocks, not the 16 blocks of the video
    # and the restored session (one fragment on already) continues as the uninterrupted one did
    rerun = pipe.start_session(PROMPT, seed=12)
    for k in range(10):
        out = rerun.next_fragment(prompt=OTHER if k == 5 else None)
    assert torch.equal(follow.next_fragment(), out)


# --------------------------------------------------------------------------------------------------
# int8 K/V
# --------------------------------------------------------------------------------------------------
def test_int8_tokens_round_within_half_a_step_of_their_group():
    from model.kvquant import Int8Tokens

    x = torch.randn(2, 10, 3, 128) * torch.logspace(-3, 2, 10)[None, :, None, None]
    buf = Int8Tokens((2, 16, 3, 128), torch.float32, "cpu")
    buf[:, 3:13] = x
    back = buf[:, 3:13]
    bound = x.unflatten(-1, (2, 64)).abs().amax(-1, keepdim=True) / 254  # half of absmax/127, per group of 64
    err = (back - x).unflatten(-1, (2, 64)).abs()
    assert (err <= bound * (1 + 1e-5)).all()
    assert buf.nbytes() / (2 * 16 * 3 * 128 * 2) == pytest.approx(0.5 + 2 / 64)  # vs bf16


def test_int8_cache_session_stays_close_and_quarters_fp32_bytes(base):
    over = dict(attention_window=6, sink_frames=2)
    full = run_blocks(pipe_with(base, **over), 4)
    quant = run_blocks(pipe_with(base, **over, kv_cache_quant="int8"), 4)
    ref, got = full.latents(), quant.latents()
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"int8 K/V: session latents relative error {rel:.2e}, max |diff| {(got - ref).abs().max().item():.2e}; "
          f"cache {quant.cache.nbytes()} B vs {full.cache.nbytes()} B fp32")
    assert 0 < rel <= 1e-3
    # head_dim 24 < 64: one group per head, a 4-byte scale per 24 int8 values; the sink's kept copy stays fp32
    sink = sum(layer.k_sink.numel() * 4 for layer in full.cache.layers)
    assert quant.cache.nbytes() - sink == pytest.approx((full.cache.nbytes() - sink) * (1 + 4 / 24) / 4)
