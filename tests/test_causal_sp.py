"""CausVid under sequence parallelism (2 spawned gloo processes) against the single-process pipeline.

One spawn runs everything: the two ranks form a Ulysses-2 group, run every case through `CausalRunner` (rank
0 loads the whole pipeline and encodes/decodes, rank 1 the DiT alone), leave it, and do the same as a ring of
2. Cases: the tiny config (blocks of 2 frames, 12 tokens, no padding, whole-session cache), a padded and
windowed one (48x48: 9 tokens per frame, blocks of 3 frames = 27 tokens, padded to 28; window 5 with a
1-frame sink, so evictions cut through blocks and a ring chunk ends mid-frame), and LightX2V's last-block
continuation (ring). On the padded case the session API's paths run too: cancel inside a block and resume,
offload/reload, state -> restore, close. Tolerance 1e-5 on latents (fp32).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_dit, torch_threads

from model.causal_pipeline import CausVidPipeline
from model.archs import TINY_T2V
from model.config import load_run_config
from model.tiny import write_tiny_model

ROOT = Path(__file__).parent.parent
BASE = json.loads((ROOT / "configs" / "tiny" / "causvid_t2v.json").read_text())
CASES = {
    "tiny": BASE,
    "padded_window": {**BASE, "target_height": 48, "target_width": 48, "frame_seq_length": 9, "num_frame_per_block": 3,
                      "num_blocks": 2, "num_frames": 6, "attention_window": 5, "sink_frames": 1},
    "last_block": {**BASE, "fragment_continuation": "last_block"},
}
MODES = {"ulysses": {"seq_p_size": 2}, "ring": {"seq_p_size": 2, "seq_p_attn_type": "ring"}}
# Ulysses ranks keep the one-process cache type (all tokens, half the heads): LightX2V's continuation, which
# only resets and refills that cache, runs under the ring alone, where the cache type is another.
RUNS = [(mode, case) for mode in MODES for case in CASES if not (mode == "ulysses" and case == "last_block")]
WORDS = "a red blue square circle moving left right".split()
PROMPT, OTHER = "a red square moving left", "a blue circle moving right"
SEED = 5
TOL = 1e-5


def causvid_config(case: str, **parallel):
    extra = {"parallel": parallel} if parallel else {}
    return load_run_config({**CASES[case], **extra}, model_cls="wan2.1_causvid")


def sp_worker(rank, world_size, addr, port, model_root, ports):
    from model.pipeline import Cancelled, RequestError
    from engine.causal_runner import CausalRunner, SessionNotFound
    from engine.protocol import share_result
    from engine.rank import load_rank_pipeline
    from parallel.group import GroupLayout, join

    out = {}
    for (mode, parallel), p in zip(MODES.items(), [port] + list(ports)):
        group = None
        for case in [c for m, c in RUNS if m == mode]:
            cfg = causvid_config(case, **parallel)
            if group is None:
                group = join(rank, world_size, addr, p, GroupLayout.from_parallel(cfg.parallel), join_timeout=60,
                             heartbeat_interval=0.2, stale_after=3)
            runner = CausalRunner(load_rank_pipeline(model_root, cfg, rank), group)
            res = {}
            runner.open("s", PROMPT, SEED)
            res["f1"] = runner.next_fragment("s")
            res["f2"] = runner.next_fragment("s", prompt=OTHER)
            session = runner.sessions["s"].session
            res["latents"] = session.latents()
            res["kv_bytes"] = session.memory_bytes()["kv_cache"]
            res["scheme"] = type(session.cache).__name__
            del session  # the runner's table must hold the only reference (the leak check below)
            if case == "padded_window":
                # a cancel inside the second block of fragment 1 (rank 0 decides), then resume: same video
                calls = []
                runner.open("c", PROMPT, SEED)
                try:
                    runner.next_fragment("c", cancel=lambda: calls.append(1) or len(calls) >= 15)
                except Cancelled as e:
                    res["cancelled"] = (str(e), runner.info("c")["blocks"])
                res["resumed"] = runner.next_fragment("c")
                runner.next_fragment("c", prompt=OTHER)
                res["cancel_latents"] = runner.sessions["c"].session.latents()
                # offload / reload, then fragment 3; a restore of the state taken before it makes the same
                state = share_result(group, runner.state("s") if rank == 0 else None)
                res["offloaded"] = runner.offload("s")
                res["stats_idle"] = runner.stats()
                res["reloaded"] = runner.reload("s")
                res["f3"] = runner.next_fragment("s")
                res["f3_latents"] = runner.sessions["s"].session.latents()[:, 12:]
                runner.restore("r", state)
                res["restored_video"] = runner.video("r")
                res["r3"] = runner.next_fragment("r")
                res["r3_latents"] = runner.sessions["r"].session.latents()[:, 12:]
                for bad in (lambda: runner.next_fragment("nope"), lambda: runner.open("x", "  ")):
                    try:
                        bad()
                    except (SessionNotFound, RequestError) as e:
                        res.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
                res["closed"] = [runner.close(sid) for sid in ("s", "c", "r", "s")]
                res["stats_closed"] = runner.stats()
            out[(mode, case)] = res
        out[(mode, "broken")] = group.broken
        group.close()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (the references take 15x longer on a busy
    2-core box). The spawned ranks run one thread each (run_local's default)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("causvid_sp"), "t2v", words=WORDS,
                            causal=tiny_dit(TINY_T2V, seed=21))


@pytest.fixture(scope="module")
def ranks(model_root):
    from parallel.group import free_port
    from engine.launch import run_local, values

    return values(run_local(sp_worker, 2, args=(str(model_root), [free_port()]), timeout=300))


@pytest.fixture(scope="module")
def serial(model_root):
    """SP=1: the plain pipeline, same seeds and prompts."""
    out = {}
    for case in CASES:
        pipe = CausVidPipeline.from_pretrained(model_root, causvid_config(case))
        s = pipe.start_session(PROMPT, seed=SEED)
        s.next_fragment()
        s.next_fragment(prompt=OTHER)
        out[case] = {"latents": s.latents(), "video": s.video(), "kv_bytes": s.memory_bytes()["kv_cache"]}
        if case == "padded_window":
            s.next_fragment()
            out[case]["f3_latents"] = s.latents()[:, 12:]
            out[case]["f3_video"] = s.video()[45:]
    return out


def _u8_close(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference in uint8 levels (1e-6 latent differences may round a pixel the other way)."""
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("mode,case", RUNS, ids=["-".join(r) for r in RUNS])
def test_block_by_block_generation_equals_sp1(ranks, serial, mode, case):
    ref = serial[case]
    for rank, out in enumerate(ranks):
        got = out[(mode, case)]
        assert (got["latents"] - ref["latents"]).abs().max().item() <= TOL, f"rank {rank}"
    r0, r1 = ranks[0][(mode, case)], ranks[1][(mode, case)]
    assert r1["f1"] is None and r1["f2"] is None  # rank 0 decodes and answers
    video = np.concatenate([r0["f1"]["frames"], r0["f2"]["frames"]])
    assert _u8_close(video, ref["video"]) <= (0 if mode == "ulysses" else 1)
    assert (r0["f1"]["fragment"], r0["f2"]["fragment"]) == (0, 1)
    assert r0["f2"]["info"]["fragments"] == 2 and r0["f2"]["info"]["frames"] == len(video)


@pytest.mark.parametrize("mode", list(MODES))
def test_cache_is_sharded_by_the_scheme(ranks, serial, mode):
    """Ulysses: every token, half the heads (exactly half the bytes). Ring: half the tokens of every block
    (exactly half without padding; the padded, windowed case keeps whole block chunks — see parallel/causal.py)."""
    for out in ranks:
        tiny, padded = out[(mode, "tiny")], out[(mode, "padded_window")]
        assert tiny["scheme"] == ("KVCache" if mode == "ulysses" else "RingKVCache")
        assert tiny["kv_bytes"] * 2 == serial["tiny"]["kv_bytes"]
        if mode == "ulysses":
            assert padded["kv_bytes"] * 2 == serial["padded_window"]["kv_bytes"]
        else:  # 3 block slots x 14 tokens (27 padded to 28, halved) vs the window's 5 frames x 9 tokens
            assert padded["kv_bytes"] * 45 == serial["padded_window"]["kv_bytes"] * 42


@pytest.mark.parametrize("mode", list(MODES))
def test_cancel_inside_a_block_then_resume_under_sp(ranks, serial, mode):
    for out in ranks:
        res = out[(mode, "padded_window")]
        assert res["cancelled"] == ("cancelled at step 4 of block 2", 1)  # block 1 stays, block 2 is redone
        assert (res["cancel_latents"] - serial["padded_window"]["latents"]).abs().max().item() <= TOL
    assert ranks[0][(mode, "padded_window")]["resumed"]["blocks"] == [1, 2]


@pytest.mark.parametrize("mode", list(MODES))
def test_offload_reload_and_restore_under_sp(ranks, serial, mode):
    ref = serial["padded_window"]
    for out in ranks:
        res = out[(mode, "padded_window")]
        assert res["offloaded"]["tier"] == "idle" and res["reloaded"]["tier"] == "active"
        assert res["stats_idle"]["idle_bytes"] == res["offloaded"]["cache_bytes"] > 0
        assert (res["f3_latents"] - ref["f3_latents"]).abs().max().item() <= TOL
        assert torch.equal(res["r3_latents"], res["f3_latents"])  # the rebuilt cache is this group's, bit for bit
    r0 = ranks[0][(mode, "padded_window")]
    assert np.array_equal(r0["restored_video"], np.concatenate([r0["f1"]["frames"], r0["f2"]["frames"]]))
    assert np.array_equal(r0["r3"]["frames"], r0["f3"]["frames"])
    assert _u8_close(r0["f3"]["frames"], ref["f3_video"]) <= (0 if mode == "ulysses" else 1)


@pytest.mark.parametrize("mode", list(MODES))
def test_errors_are_alike_on_every_rank_and_close_frees(ranks, mode):
    for out in ranks:
        res = out[(mode, "padded_window")]
        assert res["errors"] == ["SessionNotFound: session 'nope' not found: it was closed, evicted, or never opened "
                                 "on this worker group", "RequestError: prompt must not be empty"]
        assert res["closed"] == [True, True, True, False]
        assert res["stats_closed"] == {"rank": res["stats_closed"]["rank"], "sessions": 0, "active_bytes": 0,
                                       "idle_bytes": 0, "tracked_bytes": 0, "live_session_objects": 0}
        assert out[(mode, "broken")] is None


# ---------------------------------------------------------------------------------------------------------
# The ring cache's bookkeeping, in one process
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,sink", [(None, 0), (5, 1), (6, 3), (4, 0), (7, 2)])
def test_ring_cache_sees_what_the_block_causal_mask_allows(window, sink):
    """Both members of a ring of 2 write their chunk of every block (3 frames x 9 tokens = 27, padded to 28:
    each chunk ends mid-frame); every key carries its frame index (-1 for padding). The keys each block
    then attends to over both members' segments are exactly the frames `block_causal_mask` allows, once each,
    and no padding — also when the window cuts through blocks and a block is half sink."""
    from model.causal import block_causal_mask
    from parallel.causal import RingKVCache

    bf, hw, members, blocks = 3, 9, 2, 10
    length, chunk = bf * hw, 14
    frame_of = torch.tensor([t // hw if t < length else -1 for t in range(members * chunk)], dtype=torch.float32)
    caches = [RingKVCache(1, window, sink, bf, m, members) for m in range(members)]
    allowed = block_causal_mask(bf * blocks, bf, window, sink)
    for b in range(blocks):
        seen = []
        for m, cache in enumerate(caches):
            cache.begin(b * bf, bf)
            ids = frame_of[m * chunk:(m + 1) * chunk] + torch.where(frame_of[m * chunk:(m + 1) * chunk] >= 0, b * bf, 0)
            kv = ids.view(1, chunk, 1, 1)
            cache.layers[0].write(kv, kv)
            for seg in cache.layers[0].segments(length):
                k, _, mask = seg.block(m * seg.k.shape[1])
                keys = k[0, :, 0, 0]
                seen += keys[mask].tolist() if mask is not None else keys.tolist()
        want = [j for j in range(bf * blocks) if allowed[b * bf, j] for _ in range(hw)]
        assert sorted(seen) == want, f"block {b}"
    if window is not None:
        assert caches[0].slots == -(-sink // bf) + -(-(window - sink) // bf)
        assert caches[0].layers[0].nbytes() == caches[0].slots * chunk * 4 * 2
