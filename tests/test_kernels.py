"""Attention kernels chosen loudly (model/kernels.py): LightX2V's keys map to a kernel or the load fails
naming what is missing; the configured kernel is the one every attention of the DiT calls; the mask
adapter the CUDA kernels rely on equals masked SDPA (checked here with SDPA as the unmasked kernel)."""
from types import SimpleNamespace

import pytest
import torch

from helpers import dit_inputs, reference_attention, tiny_dit
from model.archs import TINY_I2V, TINY_T2V
from model.causal import CausalDiT
from model.config import ConfigError, load_run_config
from model.kernels import (
    SDPA,
    AttentionKernel,
    DiTKernels,
    KernelError,
    _per_sample,
    attention,
    attention_lse,
    resolve_kernel,
    resolve_kernels,
)
from parallel.attention import KVSegment, attend_segments


# a stand-in for a CUDA kernel: takes no mask, so masked calls go through the same adapter as flash/sage
UNMASKED = AttentionKernel(
    "unmasked", lambda q, k, v, m=None: _per_sample(attention, q, k, v, m, False),
    lambda q, k, v, m=None: _per_sample(attention_lse, q, k, v, m, True))


def test_mask_adapter_equals_masked_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 2, 8, generator=g)
    k, v = (torch.randn(3, 11, 2, 8, generator=g) for _ in range(2))
    per_sample = torch.rand(3, 11, generator=g) > 0.4
    per_sample[2] = False  # a sample with no key at all: out 0, lse -inf (adds nothing when merged)
    per_sample[0, 0] = per_sample[1, 0] = True
    shared = torch.rand(11, generator=g) > 0.5
    shared[3] = True
    for mask in (None, shared, per_sample):
        out, lse = UNMASKED.with_lse(q, k, v, mask)
        ref, ref_lse = reference_attention(q, k, v, mask)
        live = slice(0, 2) if mask is per_sample else slice(None)
        assert (out[live].double() - ref[live]).abs().max() < 1e-5
        assert (lse[live].double() - ref_lse[live]).abs().max() < 1e-5
        assert (UNMASKED(q, k, v, mask)[live].double() - ref[live]).abs().max() < 1e-5
    out, lse = UNMASKED.with_lse(q, k, v, per_sample)
    assert out[2].abs().max() == 0 and bool(torch.isinf(lse[2]).all())


def test_configured_kernel_runs_every_attention_of_the_dit():
    calls = {}

    def counting(name):
        def attend(q, k, v, m=None):
            calls[name] = calls.get(name, 0) + 1
            return attention(q, k, v, key_mask=m)
        return AttentionKernel(name, attend, None)

    for arch in (TINY_T2V, TINY_I2V):
        calls.clear()
        dit, kw = tiny_dit(arch), dit_inputs(arch, batch=1)
        with torch.no_grad():
            ref = dit(**kw)
            dit.use_kernels(DiTKernels(counting("self"), counting("text"), counting("image")))
            out = dit(**kw)
        n = arch.num_layers
        assert calls == ({"self": n, "text": n, "image": n} if arch.is_i2v else {"self": n, "text": n})
        assert torch.equal(out, ref)  # the same math through the kernel objects
        assert dit.kernels.names() == {"self_attn_1_type": "self", "cross_attn_1_type": "text",
                                       "cross_attn_2_type": "image"}
    calls.clear()  # CausVid blocks: the cache attention calls the self-attention kernel too
    dit = tiny_dit(TINY_T2V).use_kernels(DiTKernels(counting("self"), counting("text"), SDPA))
    causal = CausalDiT(dit, block_frames=1)
    kw = dit_inputs(TINY_T2V, batch=1, frames=1)
    with torch.no_grad():
        causal.forward_block(kw["x"], kw["t"], 0, causal.new_cache(), causal.context_kv(kw["context"]))
    assert calls == {"self": TINY_T2V.num_layers, "text": TINY_T2V.num_layers}
    with pytest.raises(ValueError, match="block-causal full-sequence forward needs torch_sdpa"):
        causal.forward_full(kw["x"], torch.zeros(1, 1), kw["context"])


def test_segments_merge_needs_the_kernels_lse():
    q = torch.randn(1, 4, 2, 8)
    seg = [KVSegment(q, q), KVSegment(q, q)]
    assert torch.allclose(attend_segments(q, seg, UNMASKED), attend_segments(q, seg), atol=1e-6)
    no_lse = AttentionKernel("sage_attn2", lambda q, k, v, m=None: attention(q, k, v), None)
    assert torch.equal(attend_segments(q, seg[:1], no_lse), attention(q, q, q))  # one segment: no merge
    with pytest.raises(KernelError, match="sage_attn2 returns no log-sum-exp"):
        attend_segments(q, seg, no_lse)


def test_ring_attention_refuses_a_kernel_without_lse():
    from engine.runner import attach_group
    from parallel.group import GroupLayout

    no_lse = AttentionKernel("sage_attn2", lambda q, k, v, m=None: attention(q, k, v), None)
    dit = SimpleNamespace(kernels=DiTKernels(no_lse), layout=None)
    cfg = load_run_config({"parallel": {"seq_p_size": 2, "seq_p_attn_type": "ring"}})
    pipe = SimpleNamespace(cfg=cfg, dit=dit, denoise_only=False, device="cpu")
    group = SimpleNamespace(layout=GroupLayout(ring=2), rank=0, ring=SimpleNamespace(size=2))
    with pytest.raises(KernelError, match=r"sage_attn2 returns no log-sum-exp, which ring attention merges"):
        attach_group(pipe, group)


def test_kernel_names_and_what_is_missing(monkeypatch):
    assert resolve_kernel("torch_sdpa", "cpu", torch.float32) is SDPA
    with pytest.raises(KernelError, match=r"self_attn_1_type = flash_attn3: needs a CUDA GPU; this model loads on cpu"):
        resolve_kernel("flash_attn3", "cpu", torch.bfloat16)
    with pytest.raises(ConfigError, match="unknown attention kernel 'flash_attn4'"):
        load_run_config({"self_attn_1_type": "flash_attn4"})
    with pytest.raises(ConfigError, match="sparse \\(Radial\\) attention changes the model's outputs"):
        load_run_config({"self_attn_1_type": "radial_attn"})
    # a GPU, as far as the checks can tell: its generation, the dtype and the package decide
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A10")
    with pytest.raises(KernelError, match=r"flash_attn3: needs a GPU of compute capability 9.0 or newer; NVIDIA A10 "
                                          r"is 8.6"):
        resolve_kernel("flash_attn3", "cuda", torch.bfloat16)
    with pytest.raises(KernelError, match="runs in float16/bfloat16; the model computes in torch.float32"):
        resolve_kernel("flash_attn2", "cuda", torch.float32)
    with pytest.raises(KernelError, match=r"cross_attn_1_type = flash_attn2: the flash_attn package is not installed "
                                          r"\(pip install flash-attn"):
        resolve_kernels({"cross_attn_1_type": "flash_attn2"}, "cuda", torch.bfloat16, probe=lambda m: False)


def test_pipeline_load_fails_before_reading_weights(tmp_path):
    """A LightX2V config asking for flash_attn3 on this CPU machine: the load names what is missing."""
    from model.pipeline import WanPipeline
    from model.tiny import write_tiny_model

    root = write_tiny_model(tmp_path / "m")
    (root / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")  # proves the check comes first
    cfg = load_run_config({"self_attn_1_type": "flash_attn3", "target_height": 32, "target_width": 32,
                           "target_video_length": 5, "text_len": TINY_T2V.text_len})
    with pytest.raises(KernelError, match="self_attn_1_type = flash_attn3: needs a CUDA GPU"):
        WanPipeline.from_pretrained(root, cfg)
