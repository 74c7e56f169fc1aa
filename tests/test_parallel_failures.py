"""A rank that fails, dies or never joins: the others fail within bounded time, naming it; nothing hangs.

Four spawned processes form two independent groups of two:
- pair A (ranks 0, 1) runs distill generations through ParallelRunner: first rank 1's DiT raises mid-job
  (a Python error: rank 1 posts it and leaves the group), then, in a new group, rank 1 exits abruptly;
- pair B (ranks 2, 3) runs SP DiT forwards in a loop until its rank 0 (the store host) exits abruptly.
Each survivor records what it raised and when; a killed rank records when it died. Never-joining ranks are
covered in test_parallel_units.py (no processes needed). Every launch has a hard deadline.
"""
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_dit

from model.archs import TINY_T2V

STALE_AFTER = 2.0
GROUP_OPTS = dict(join_timeout=60, op_timeout=60, heartbeat_interval=0.2, stale_after=STALE_AFTER)
BOUND_S = 15.0  # from the fault to the survivor's error


def _record(tmp: str, name: str, value) -> None:
    Path(tmp, name).write_bytes(pickle.dumps(value))


def _outcome(fn):
    from parallel.group import RankFailure

    try:
        fn()
        return {"kind": "finished", "t": time.time()}
    except RankFailure as e:
        return {"kind": "RankFailure", "msg": str(e), "ranks": e.ranks, "t": time.time()}
    except Exception as e:
        return {"kind": type(e).__name__, "msg": str(e), "t": time.time()}


def _fault(tmp: str, name: str, how: str, after: int, call):
    """Wrap a callable: after `after` calls, raise or die (recording the time first)."""
    count = [0]

    def wrapped(*a, **kw):
        count[0] += 1
        if count[0] > after:
            _record(tmp, f"{name}_fault", time.time())
            if how == "exit":
                os._exit(17)
            raise ValueError("injected fault")
        return call(*a, **kw)

    return wrapped


def pair_a(local, addr, ports, model_root, tmp):
    from model.config import load_run_config
    from model.pipeline import Request
    from parallel.group import GroupLayout, join
    from engine.rank import load_rank_pipeline
    from engine.runner import ParallelRunner

    cfg = load_run_config({"target_video_length": 5, "target_height": 32, "target_width": 48, "enable_cfg": False,
                           "denoising_step_list": [1000, 750, 500, 250], "parallel": {"seq_p_size": 2}},
                          model_cls="wan2.1_distill", task="t2v")
    pipe = load_rank_pipeline(model_root, cfg, local)
    forward = pipe.dit.forward
    for scenario, port in (("raise", ports[0]), ("exit", ports[1])):
        group = join(local, 2, addr, port, GroupLayout(ulysses=2), **GROUP_OPTS)
        runner = ParallelRunner(pipe, group)
        pipe.dit.forward = _fault(tmp, scenario, scenario, 2, forward) if local == 1 else forward
        request = Request("a red square") if local == 0 else None
        _record(tmp, f"{scenario}_rank{local}", _outcome(lambda r=runner: r.generate(request)))  # noqa: B023
        group.close()


def pair_b(local, addr, port, tmp):
    from helpers import dit_inputs

    from model.archs import TINY_T2V
    from parallel.attention import SequenceParallelLayout
    from parallel.group import GroupLayout, join

    group = join(local, 2, addr, port, GroupLayout(ulysses=2), **GROUP_OPTS)
    dit = tiny_dit(TINY_T2V, seed=1)
    dit.layout = SequenceParallelLayout(group)
    kw = dit_inputs(TINY_T2V, batch=1)
    step = _fault(tmp, "exit0", "exit", 3, lambda: dit(**kw)) if local == 0 else (lambda: dit(**kw))

    def loop():
        with group.watch("forward loop"), torch.no_grad():
            for _ in range(50):
                step()

    _record(tmp, f"exit0_rank{local}", _outcome(loop))
    group.close()


def failure_worker(rank, world_size, addr, port, model_root, ports, tmp):
    if rank < 2:
        pair_a(rank, addr, ports[:2], model_root, tmp)
    else:
        pair_b(rank - 2, addr, ports[2], tmp)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from model.tiny import write_tiny_model
    from parallel.group import free_port
    from engine.launch import run_local

    root = write_tiny_model(tmp_path_factory.mktemp("fail_t2v"), "t2v", words=["a", "red", "square"],
                            distill=tiny_dit(TINY_T2V, seed=2))
    tmp = tmp_path_factory.mktemp("fail_records")
    t0 = time.monotonic()
    outcomes = run_local(failure_worker, 4, args=(str(root), [free_port() for _ in range(3)], str(tmp)), timeout=180)
    elapsed = time.monotonic() - t0
    recs = {p.name: pickle.loads(p.read_bytes()) for p in tmp.iterdir()}
    return recs, outcomes, elapsed


def test_rank_that_raises_is_named_with_its_error(records):
    recs, _, _ = records
    victim, survivor = recs["raise_rank1"], recs["raise_rank0"]
    assert victim["kind"] == "ValueError"
    assert survivor["kind"] == "RankFailure" and survivor["ranks"] == [1]
    assert "rank 1 failed: ValueError: injected fault" in survivor["msg"]
    assert survivor["t"] - recs["raise_fault"] < BOUND_S


def test_rank_that_dies_mid_job_is_named(records):
    recs, outcomes, _ = records
    survivor = recs["exit_rank0"]
    assert "exit_rank1" not in recs and outcomes[1].exitcode == 17  # it really died
    assert survivor["kind"] == "RankFailure" and survivor["ranks"] == [1]
    assert "rank 1 stopped responding" in survivor["msg"]
    assert survivor["t"] - recs["exit_fault"] < BOUND_S


def test_store_host_rank0_that_dies_is_named(records):
    recs, outcomes, elapsed = records
    survivor = recs["exit0_rank1"]
    assert outcomes[2].exitcode == 17
    assert survivor["kind"] == "RankFailure" and survivor["ranks"] == [0]
    assert "rank 0" in survivor["msg"]
    assert survivor["t"] - recs["exit0_fault"] < BOUND_S
    assert elapsed < 150  # and the whole launch ended, long before its hard deadline
