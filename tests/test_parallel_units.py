"""Sequence parallelism, in one process: group layouts, local kernels with log-sum-exp, segment masking,
bounded joining. (The multi-process numerics are in test_parallel_sp.py / test_parallel_sp4.py.)"""
import json
import sys
import threading
import time

import pytest
import torch

from helpers import reference_attention
from model.archs import DiTArch
from model.config import ConfigError, load_run_config
from model.kernels import attention, attention_lse
from parallel.attention import KVSegment, SequenceParallelAttention, attend_segments, merge_partial
from parallel.group import (
    CollectiveError,
    Group,
    GroupError,
    GroupLayout,
    RankFailure,
    SubGroup,
    free_port,
    host_store,
    is_comm_error,
    join,
    wait,
)
from parallel.heartbeat import Heartbeat


# ---- layouts ---------------------------------------------------------------------------------------
def test_sp_innermost_group_layout():
    lay = GroupLayout(ulysses=2, ring=1, cfg=2)
    assert lay.world_size == 4
    assert lay.sp_groups() == [[0, 1], [2, 3]]
    assert lay.cfg_groups() == [[0, 2], [1, 3]]
    hybrid = GroupLayout(ulysses=2, ring=2)
    assert hybrid.ulysses_groups() == [[0, 1], [2, 3]] and hybrid.ring_groups() == [[0, 2], [1, 3]]
    assert hybrid.coords(3) == {"cfg": 0, "sp": 3, "ring": 1, "ulysses": 1}
    big = GroupLayout(ulysses=2, ring=2, cfg=2)
    assert big.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert big.ring_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert big.cfg_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # every rank is in exactly one group of each kind
    for groups in (big.sp_groups(), big.cfg_groups(), big.ulysses_groups(), big.ring_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))


def test_lightx2v_parallel_keys_give_the_layout():
    cfg = load_run_config("configs/wan21/wan_t2v_dist_cfg_ulysses.json")  # seq_p_size 4, ulysses, cfg_p_size 2
    assert GroupLayout.from_parallel(cfg.parallel) == GroupLayout(ulysses=4, ring=1, cfg=2)
    ring = load_run_config({"parallel": {"seq_p_size": 2, "seq_p_attn_type": "ring"}})
    assert GroupLayout.from_parallel(ring.parallel) == GroupLayout(ulysses=1, ring=2, cfg=1)
    hybrid = load_run_config({"parallel": {"seq_p_size": 4, "ulysses_degree": 2, "ring_degree": 2}})
    assert GroupLayout.from_parallel(hybrid.parallel).world_size == 4
    assert GroupLayout.from_parallel(None) == GroupLayout()
    with pytest.raises(ConfigError, match="ulysses degree = 4: must divide num_heads=2"):
        load_run_config({"parallel": {"seq_p_size": 4}}).check_arch(
            DiTArch(model_type="t2v", dim=48, ffn_dim=96, num_heads=2, num_layers=1))


def test_ulysses_degree_must_divide_heads():
    attn = SequenceParallelAttention(SubGroup([0, 1, 2], 0), SubGroup([0], 0))
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="Ulysses degree 3 must divide the number of attention heads \\(2\\)"):
        attn(q, [KVSegment(q, q)])


# ---- local kernels -----------------------------------------------------------------------------------
def test_attention_lse_matches_float64_reference_with_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, 3, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 13, generator=g) > 0.3
    mask[:, 0] = True
    out, lse = attention_lse(q, k, v, mask)
    ref, ref_lse = reference_attention(q, k, v, mask)
    assert (out.double() - ref).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5
    out, lse = attention_lse(q, k, v)
    ref, ref_lse = reference_attention(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


def test_lse_merge_of_key_blocks_equals_whole_attention():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 2, 8, generator=g)
    k, v = (torch.randn(1, 20, 2, 8, generator=g) for _ in range(2))
    acc = None
    for a, b in ((0, 3), (3, 11), (11, 20)):  # uneven blocks, merged in any order
        acc = merge_partial(acc, attention_lse(q, k[:, a:b], v[:, a:b]))
    ref, ref_lse = reference_attention(q, k, v)
    assert (acc[0].double() - ref).abs().max() < 1e-5
    assert (acc[1].double() - ref_lse).abs().max() < 1e-5


def test_segments_cache_plus_current_with_padding_and_masks():
    """CausVid's shape of call: queries of the current block over [cached K/V ; current K/V]."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 2, 8, generator=g)
    kc, vc = (torch.randn(2, 10, 2, 8, generator=g) for _ in range(2))  # cache buffer, 7 slots filled
    kn, vn = (torch.randn(2, 6, 2, 8, generator=g) for _ in range(2))
    drop = torch.ones(2, 6, dtype=torch.bool)
    drop[1, 2] = False  # an arbitrary masked key in the current block of sample 1
    out = attend_segments(q, [KVSegment(kc, vc, valid=7), KVSegment(kn, vn, key_mask=drop)])
    ref, _ = reference_attention(q, torch.cat([kc[:, :7], kn], 1), torch.cat([vc[:, :7], vn], 1),
                                 torch.cat([torch.ones(2, 7, dtype=torch.bool), drop], 1))
    assert (out.double() - ref).abs().max() < 1e-5
    # a sample whose current block is masked entirely attends to the cache alone
    none = drop.clone()
    none[0] = False
    out = attend_segments(q, [KVSegment(kc, vc, valid=7), KVSegment(kn, vn, key_mask=none)])
    ref, _ = reference_attention(q, torch.cat([kc[:, :7], kn], 1), torch.cat([vc[:, :7], vn], 1),
                                 torch.cat([torch.ones(2, 7, dtype=torch.bool), none], 1))
    assert (out.double() - ref).abs().max() < 1e-5
    # one segment: the DiT's own attention function, bit for bit
    assert torch.equal(attend_segments(q, [KVSegment(kn, vn)]), attention(q, kn, vn))
    with pytest.raises(ValueError, match="empty key set"):
        attend_segments(q, [KVSegment(kc, vc, valid=0)])


# ---- joining: bounded, and the error names who is missing ------------------------------------------------
def test_missing_rank_is_named_within_the_join_timeout():
    t0 = time.monotonic()
    with pytest.raises(GroupError, match=r"rank 1 did not join the group of 2 .*joined: \[0\]"):
        join(0, 2, "127.0.0.1", free_port(), join_timeout=1.5)
    assert time.monotonic() - t0 < 6


def test_unreachable_rank0_is_named():
    t0 = time.monotonic()
    with pytest.raises(GroupError, match=r"rank 1: rank 0 \(the group's store at 127.0.0.1:\d+\) is not reachable"):
        join(1, 2, "127.0.0.1", free_port(), join_timeout=1.5)
    assert time.monotonic() - t0 < 8


def test_rank0_picks_the_port_and_a_late_rank_is_named_by_rank0():
    store = host_store(3, port=0, timeout=5)
    assert store.port > 0
    errors = {}

    def rank2():  # joins, but rank 1 never comes
        try:
            join(2, 3, "127.0.0.1", store.port, join_timeout=1.5)
        except GroupError as e:
            errors[2] = str(e)

    th = threading.Thread(target=rank2)
    th.start()
    with pytest.raises(GroupError, match=r"rank 1 did not join the group of 3 .*joined: \[0, 2\]"):
        join(0, 3, "127.0.0.1", store.port, store=store, join_timeout=1.5)
    th.join(10)
    assert "rank 1 did not join" in errors[2]


# ---- failures: whose fault is it? ------------------------------------------------------------------------
def test_own_runtime_error_that_mentions_connecting_is_this_ranks_failure():
    """A message about connecting, raised by the rank's own code, is not the network's: the rank posts it
    and breaks the group with its reason (the peers then name this rank, test_parallel_failures.py)."""
    group = join(0, 1, "127.0.0.1", free_port(), heartbeat_interval=0.1, stale_after=5.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="could not connect to the cache server") as err, group.watch("job"):
            raise RuntimeError("could not connect to the cache server")
        assert not isinstance(err.value, RankFailure)
        assert time.monotonic() - t0 < 2  # no wait for a peer's evidence
        assert group.broken == "rank 0 failed: could not connect to the cache server"
        beat = json.loads(group.store.get("wanserve/hb/0"))
        assert beat["failed"] == "RuntimeError: could not connect to the cache server" and beat["blames"] == []
        with pytest.raises(RankFailure, match="the group is broken"), group.watch("next job"):
            pass
    finally:
        group.close()


def test_comm_errors_are_told_by_type_and_by_where_they_were_raised():
    import torch.distributed as dist

    group = join(0, 1, "127.0.0.1", free_port(), heartbeat_interval=0.1)
    try:
        with pytest.raises(RuntimeError, match="invalid root rank") as gloo:  # gloo's plain RuntimeError
            dist.broadcast(torch.zeros(3), src=3)
        assert type(gloo.value) is RuntimeError and is_comm_error(gloo.value)
    finally:
        group.close()
    assert is_comm_error(dist.DistNetworkError("Connection reset by peer"))
    for text in ("Socket closed", "Timed out waiting", "could not connect", "NCCL error"):  # words, not a place
        try:
            raise RuntimeError(text)
        except RuntimeError as e:
            assert not is_comm_error(e), text
    assert not is_comm_error(ValueError("gloo"))

    class Work:  # a p2p op whose peer went away: gloo raises in the caller's frame
        def wait(self):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(CollectiveError, match="Connection closed by peer") as p2p:
        wait(Work())
    assert is_comm_error(p2p.value)


def test_an_error_while_a_peer_is_gone_is_blamed_on_the_peer():
    """The heartbeat's evidence decides too: rank 1 posted its failure, so rank 0's error is a consequence."""
    store = host_store(2, port=0, timeout=5)
    hb = Heartbeat(store, 0, 2, interval=0.1)
    hb.peers[1].update(failed="ValueError: injected fault")
    assert hb.evidence(5.0, "h:1") == ([1], "rank 1 failed: ValueError: injected fault")
    group = Group(0, 2, GroupLayout(ulysses=2), torch.device("cpu"), "gloo", store, "127.0.0.1", store.port,
                  heartbeat=hb, _owns_pg=False)
    assert group.peer_gone()
    with pytest.raises(RankFailure, match="rank 1 failed: ValueError: injected fault") as err, group.watch("job"):
        raise RuntimeError("tensor on a closed connection")
    assert err.value.ranks == [1] and json.loads(store.get("wanserve/hb/0"))["blames"] == [1]
    hb.peers[1].update(failed=None)  # no evidence left: rank 0's own error would be its own failure
    assert hb.evidence(5.0, "h:1") is None and not group.peer_gone()


def test_nccl_teardown_aborts_each_group_once_and_logs_what_failed(caplog):
    """The NCCL branch of teardown (no GPU here: fake groups): sub-groups newest first, each once; one that
    cannot be aborted is logged and the others are still aborted."""
    from parallel.group import _abort_nccl

    calls = []

    class PG:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def abort(self):
            calls.append(self.name)
            if self.fail:
                raise RuntimeError("NCCL communicator already aborted")

    sp, ulysses, ring = PG("sp"), PG("ulysses", fail=True), PG("ring")
    with caplog.at_level("WARNING", logger="parallel.group"):
        _abort_nccl(3, [sp, None, ulysses, ring, sp])  # world: not initialized here, so skipped
    assert calls == ["sp", "ring", "ulysses"]
    assert "rank 3: aborting a NCCL process group failed (NCCL communicator already aborted)" in caplog.text


def test_no_cuda_library_is_imported_on_cpu():
    """(The spawned ranks of test_parallel_sp*.py check the same after running the whole CPU path.)"""
    assert "xfuser" not in sys.modules


def test_world_size_must_match_the_layout():
    with pytest.raises(GroupError, match=r"world_size = 2 but the layout \(ulysses 4 x ring 1 x cfg 1\) needs 4 ranks"):
        join(0, 2, "127.0.0.1", free_port(), GroupLayout(ulysses=4))


def test_cuda_branch_is_selected_by_device():
    """nccl and the xDiT/yunchang layers on CUDA tensors only; a CPU tensor never reaches them."""
    from parallel.attention import load_usp
    from parallel.group import backend_for

    assert backend_for(torch.device("cuda", 3)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"
    attn = SequenceParallelAttention(SubGroup([0, 1], 0), SubGroup([0], 0), backend="yunchang")
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert not attn._usp_fits(x, [KVSegment(x, x)])
    # the backend's wiring: yunchang's layer (xfuser is not installed here) bound to our own groups
    uly, ring = object(), object()
    layer = load_usp("yunchang", "flash_attn3", SubGroup([0, 1], 0, uly), SubGroup([0], 0, ring))
    assert type(layer).__name__ == "LongContextAttention" and layer.ulysses_pg is uly and layer.ring_pg is ring
    assert layer.attn_type.name == "FA3"


def test_sp_backend_that_cannot_run_fails_naming_the_package():
    from model.kernels import KernelError
    from parallel.attention import load_usp

    groups = SubGroup([0, 1], 0), SubGroup([0], 0)
    with pytest.raises(KernelError, match=r"sp_backend = xfuser: the xfuser package is not installed"):
        load_usp("xfuser", "torch_sdpa", *groups, probe=lambda m: m == "yunchang")
    with pytest.raises(KernelError, match="imports flash_attn, which is not installed"):
        load_usp("xfuser", "torch_sdpa", *groups, probe=lambda m: m == "xfuser")
    with pytest.raises(ConfigError, match="sp_backend = 'xfuser': shards attention over seq_p_size > 1"):
        load_run_config({"parallel": {"seq_p_size": 1, "sp_backend": "xfuser"}})
