"""`compile`: the DiT's blocks under torch.compile, warmed up at load so no request pays the compile.

Regional: each `Block` of `dit.blocks` is compiled in place (`nn.Module.compile`: state-dict names, LoRA,
quantized linears and FSDP sharding stay as they are); embeddings, head and the sampler run eagerly. The
blocks share one graph per input shape, so a size costs one block compile whatever the depth. Shapes are
static (`dynamic=False`): `warm_up` runs the DiT once at each configured size with the exact inputs a
request makes, and an unwarmed size compiles on its first request. Compiled equals eager within
`TOLERANCE` (fp32; tests/test_compile.py). Attention that talks to other ranks or to a CausVid cache
stays eager (`keep_attention_eager`): dynamo would split the block at each timer and collective, and
recompile at every cache length. Timings: benchmarks/compile_warmup.py.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .archs import VAE_SPACE_STRIDE, latent_frames
from .config import format_size, parse_size

BACKEND = "inductor"
TOLERANCE = 1e-5  # max abs, compiled vs eager DiT output, fp32 (inductor reorders reductions: ~1e-6 seen)
RELEASE_CLIP_TOKENS = 257  # Wan2.1's CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token


def compile_dit(dit: torch.nn.Module, backend: str = BACKEND, dynamic: bool = False) -> torch.nn.Module:
    """Compile every block of `dit` in place (the rest stays eager); returns `dit`.

    dynamic=False: one graph per size, no symbolic-shape guards; the sizes a replica serves are known
    (the config's and `warmup_sizes`), and `warm_up` compiles them before the first request."""
    for blk in dit.blocks:
        blk.compile(backend=backend, dynamic=dynamic)
    dit.compile_options = {"backend": backend, "dynamic": dynamic}
    return dit


def is_compiled(dit: torch.nn.Module) -> bool:
    return len(dit.blocks) > 0 and all(getattr(b, "_compiled_call_impl", None) is not None for b in dit.blocks)


def _eager(fn):
    """fn, run by Python even when called from a compiled block (one clean graph break around it)."""
    if getattr(fn, "_wanserve_eager", False):
        return fn
    wrapped = torch.compiler.disable(fn)
    wrapped._wanserve_eager = True
    return wrapped


def keep_attention_eager(dit: torch.nn.Module, causal: Any | None = None) -> None:
    """Run the self-attention outside the compiled graphs where tracing it does harm (idempotent).

    A sharded layout's attention times each collective with time.perf_counter (CommStats), which dynamo
    cannot trace: 12 graph breaks per block (13 small graphs) at Ulysses 2. Kept eager: 2 graphs per block,
    one break at the all-to-all. The CausVid cache attention reads Python ints (frames held, slots) that
    dynamo specialises on: a recompile at every block position, past the recompile limit. Kept eager, a
    block's shapes do not depend on the key length, so one warm-up block covers a whole session."""
    layout = dit.layout
    if getattr(layout, "sharded", False) and "self_attention" not in vars(layout):
        layout.self_attention = _eager(layout.self_attention)
    if causal is not None:
        causal.use_attention(_eager(causal.attend), causal.cache_factory)


def configured_sizes(cfg) -> list[tuple[int, int]]:
    """(height, width) a replica warms up: the config's own size, then `warmup_sizes`, without repeats."""
    sizes = [(cfg.target_height, cfg.target_width), *(parse_size(s) for s in cfg.warmup_sizes or ())]
    return list(dict.fromkeys(sizes))


def clip_tokens(pipe) -> int | None:
    """CLIP tokens per image of an i2v pipeline's image encoder (None without one: a denoise-only rank)."""
    enc = getattr(pipe, "image_encoder", None)
    if enc is None:
        return None
    c = enc.model.config
    return (c.image_size // c.patch_size) ** 2 + 1


def _dummy_inputs(dit, height: int, width: int, frames: int, device, n_clip: int | None) -> dict:
    """The DiT inputs of one sampler step of a request at this size: what WanPipeline.denoise passes
    (batch 1 per call, CFG or not; t a [1] float64 timestep; latents float32)."""
    arch = dit.arch
    lat = (frames, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE)
    kw = {"x": torch.zeros(1, arch.out_dim, *lat, device=device),
          "t": torch.full((1,), 999.0, dtype=torch.float64, device=device),
          "context": torch.zeros(1, arch.text_len, arch.text_dim, device=device)}
    if arch.is_i2v:
        kw["clip_fea"] = torch.zeros(1, n_clip or RELEASE_CLIP_TOKENS, arch.img_dim, device=device)
        kw["y"] = torch.zeros(1, arch.in_dim - arch.out_dim, *lat, device=device)
    return kw


def _run_causal_block(causal, cfg, height: int, width: int, device) -> None:
    """One CausVid block forward on a throwaway cache: a session's every block has these block shapes."""
    arch = causal.arch
    cache = causal.new_cache()
    cache.reserve(cfg.num_frame_per_block)
    ctx_kv = causal.context_kv(torch.zeros(1, arch.text_len, arch.text_dim, device=device))
    x = torch.zeros(1, arch.out_dim, cfg.num_frame_per_block, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE,
                    device=device)
    causal.forward_block(x, torch.full((1,), 999.0, dtype=torch.float64), 0, cache, ctx_kv)


@torch.no_grad()
def warm_up(pipe, n_clip: int | None = None) -> dict[str, Any]:
    """Run the DiT of `pipe` (a WanPipeline or a CausVidPipeline) once at each configured size.

    Under sequence parallelism every rank of the group calls this together (the forwards hold collectives)
    with the same config, so the shapes are identical. n_clip: CLIP tokens per image (i2v; rank 0's
    `clip_tokens(pipe)`, which denoise-only ranks cannot compute). Returns the report the runners expose:
    {"compiled": True, "backend", "sizes": {"WIDTHxHEIGHT": seconds}, "seconds"}; {"compiled": False} when
    the config does not compile."""
    cfg, dit, device = pipe.cfg, pipe.dit, torch.device(pipe.device)
    if not cfg.compile:
        return {"compiled": False}
    if not is_compiled(dit):
        raise RuntimeError("compile = true but the DiT's blocks are not compiled; load it with load_components")
    causal = getattr(pipe, "causal", None)
    keep_attention_eager(dit, causal)
    sizes = configured_sizes(cfg)
    dynamo, key = torch._dynamo.config, "recompile_limit"
    key = key if hasattr(dynamo, key) else "cache_size_limit"  # its name before torch 2.7
    setattr(dynamo, key, max(getattr(dynamo, key), 4 * len(sizes) + 8))  # every warmed size keeps its graphs
    report, t_all = {}, time.perf_counter()
    for height, width in sizes:
        t0 = time.perf_counter()
        if causal is not None:
            _run_causal_block(causal, cfg, height, width, device)
        else:
            dit(**_dummy_inputs(dit, height, width, latent_frames(cfg.target_video_length), device,
                                n_clip or clip_tokens(pipe)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report[format_size(height, width)] = round(time.perf_counter() - t0, 3)
    return {"compiled": True, "backend": getattr(dit, "compile_options", {}).get("backend", BACKEND),
            "sizes": report, "seconds": round(time.perf_counter() - t_all, 3)}
