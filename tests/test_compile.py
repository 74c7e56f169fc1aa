"""`compile`: the DiT's blocks under torch.compile (inductor, on the CPU), warmed up at load (model/compile.py).

Tolerance: compiled equals eager within model.compile.TOLERANCE = 1e-5 max abs, fp32 (the suite's SP
tolerance; inductor's fused reductions differ from eager by ~5e-7 on these outputs). "No recompilation"
is checked with torch's `fail_on_recompile` stance (the forward raises if dynamo would compile) and the
dynamo frame counter; a control at an unwarmed size shows that the check fails when it should.
"""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import dit_inputs, tiny_dit, torch_threads
from torch._dynamo.utils import counters

from model.archs import TINY_T2V
from model.causal_pipeline import CausVidPipeline
from model.compile import TOLERANCE, compile_dit, configured_sizes, is_compiled, warm_up
from model.config import load_run_config
from model.pipeline import WanPipeline
from model.tiny import write_tiny_model

WORDS = ["a", "red", "blue", "square", "moving", "left"]
PROMPT = "a red square moving left"
# 5 frames at 32x48: latent 2 x 4 x 6, 12 tokens (the same block shapes in every test: one compile)
SMALL = {"target_video_length": 5, "target_height": 32, "target_width": 48}
BASE = {**SMALL, "infer_steps": 3, "sample_shift": 5, "enable_cfg": True}
CAUSVID = json.loads((Path(__file__).parent.parent / "configs" / "tiny" / "causvid_t2v.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def compiled_frames() -> int:
    return counters["frames"]["total"]


def no_recompile():
    return torch.compiler.set_stance("fail_on_recompile")


@pytest.fixture(scope="module")
def dits():
    eager = tiny_dit(TINY_T2V, seed=3)
    return eager, compile_dit(copy.deepcopy(eager))


def test_compiled_dit_equals_eager_without_graph_breaks(dits):
    eager, compiled = dits
    assert is_compiled(compiled) and not is_compiled(eager)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: the official names stay
    kw = dit_inputs(TINY_T2V, batch=1, frames=2, h=4, w=6)
    with torch.no_grad():
        ref, got = eager(**kw), compiled(**kw)
    assert (got - ref).abs().max().item() <= TOLERANCE
    # the block as dynamo sees it in that forward: one graph, the attention kernel object traced through
    args = {}
    hook = eager.blocks[0].register_forward_pre_hook(lambda m, a: args.setdefault("a", a))
    with torch.no_grad():
        eager(**kw)
        hook.remove()
        explained = torch._dynamo.explain(eager.blocks[0])(*args["a"])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_warm_up_compiles_the_configured_sizes_before_the_first_request(dits):
    eager, compiled = dits
    cfg = load_run_config({**SMALL, "compile": True, "warmup_sizes": ["32x32", "48x32"]}, model_cls="wan2.1")
    assert configured_sizes(cfg) == [(32, 48), (32, 32)]  # the config's own first; repeats dropped
    report = warm_up(SimpleNamespace(cfg=cfg, dit=compiled, device="cpu"))
    assert report["compiled"] and set(report["sizes"]) == {"48x32", "32x32"}
    before = compiled_frames()
    with torch.no_grad(), no_recompile():
        for h, w in ((4, 6), (4, 4)):  # the two warmed latent sizes, CFG's batch-1 calls, a float64 timestep
            kw = dit_inputs(TINY_T2V, batch=1, frames=2, h=h, w=w, text=5)
            kw["t"] = torch.tensor([937.5], dtype=torch.float64)
            assert (compiled(**kw) - eager(**kw)).abs().max().item() <= TOLERANCE
    assert compiled_frames() == before
    # control: a size nobody warmed up would compile in the request, and the check says so
    with torch.no_grad(), no_recompile(), pytest.raises(RuntimeError, match="recompile"):
        compiled(**dit_inputs(TINY_T2V, batch=1, frames=2, h=2, w=10))


def test_warm_up_without_compile_reports_it():
    cfg = load_run_config(SMALL, model_cls="wan2.1")
    assert warm_up(SimpleNamespace(cfg=cfg, dit=tiny_dit(TINY_T2V), device="cpu")) == {"compiled": False}


@pytest.fixture(scope="module")
def t2v_root(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("t2v"), "t2v", words=WORDS)


def test_config_compile_reaches_the_pipeline(t2v_root):
    """compile = true in the config: load_components compiles the blocks; after the warm-up a whole
    generation (UniPC + CFG) compiles nothing and equals the eager pipeline."""
    eager = WanPipeline.from_pretrained(t2v_root, load_run_config(BASE, model_cls="wan2.1"))
    pipe = WanPipeline.from_pretrained(t2v_root, load_run_config({**BASE, "compile": True}, model_cls="wan2.1"))
    assert is_compiled(pipe.dit) and not is_compiled(eager.dit)
    assert warm_up(pipe)["sizes"].keys() == {"48x32"}
    before = compiled_frames()
    with no_recompile():
        got = pipe.generate(PROMPT, seed=5)
    assert compiled_frames() == before and got.nfe == 6
    ref = eager.generate(PROMPT, seed=5)
    assert (got.latents - ref.latents).abs().max().item() <= TOLERANCE


def test_causvid_compile_is_honoured(tmp_path):
    """CausVid: the block forward is compiled and the cache attention stays eager, so one warm-up block
    covers every block of a session (the key length grows; the compiled shapes do not)."""
    root = write_tiny_model(tmp_path, "t2v", words=WORDS, causal=tiny_dit(TINY_T2V, seed=21))
    eager = CausVidPipeline.from_pretrained(root, load_run_config(CAUSVID, model_cls="wan2.1_causvid"))
    pipe = CausVidPipeline.from_pretrained(root, load_run_config({**CAUSVID, "compile": True},
                                                                 model_cls="wan2.1_causvid"))
    assert is_compiled(pipe.dit)
    assert warm_up(pipe)["sizes"].keys() == {"48x32"}
    before = compiled_frames()
    with no_recompile():
        got = pipe.generate(PROMPT, seed=3, num_fragments=1)
    assert compiled_frames() == before and got.nfe == 3 * (9 + 1)  # 3 blocks x (9 steps + the clean pass)
    ref = eager.generate(PROMPT, seed=3, num_fragments=1)
    assert (got.latents - ref.latents).abs().max().item() <= TOLERANCE
