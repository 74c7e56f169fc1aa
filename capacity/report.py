"""What the planner prints: one workload's figures as JSON, the calibration fit, and README's tables.

Kept apart from the model so that README's "Sizing a cluster" tables are regenerated, never hand-edited
(`python benchmarks/capacity.py --table`).
"""
from __future__ import annotations

from dataclasses import asdict, replace

from capacity.calibration import (
    CALIBRATED_ON,
    RANGE_TOLERANCE,
    WAN21_PUBLISHED,
    FitRow,
    calibrate,
    held_out,
    upstream_workload,
)
from capacity.comm import cfg_gather_bytes_per_step, fsdp_bytes_per_forward, sp_bytes_per_forward
from capacity.flops import (
    clip_flops,
    dit_forward_flops,
    t5_flops,
    tiny_decode_flops,
    vae_decode_flops,
    vae_encode_flops,
)
from capacity.footprint import RESERVED_BYTES
from capacity.hardware import GB, GIB, GPUS
from capacity.plan import memory, project, replicas_for
from capacity.timing import (
    Calibration,
    decode_split_of,
    encode_split_of,
    fp8_compute_forward,
    vae_decode_terms,
    vae_encode_terms,
)
from capacity.vae_split import VaeSplit
from capacity.workload import Workload


def workload_json(w: Workload, gpu: str = "H100", target_vpm: float | None = None) -> dict:
    """Everything the planner says about one workload on gpu (the CLI prints it as JSON)."""
    fit = calibrate(CALIBRATED_ON[gpu])
    cal = fit.calibration
    arch = w.arch
    dit = dit_forward_flops(arch, w.grid)
    proj = project(w, gpu, cal)
    mem = memory(w, gpu, cal)
    sp = sp_bytes_per_forward(arch, w.tokens, w.ulysses, w.ring)
    out = {
        "workload": {**asdict(w), "tokens": w.tokens, "latent_grid": list(w.grid), "gpus": w.gpus},
        "flops": {
            "dit_forward": {**asdict(dit), "attention": dit.attention, "total": dit.total},
            "dit_forwards_per_video": w.steps * (2 if w.cfg else 1),
            "t5_per_prompt": t5_flops(arch.text_len),
            "vae_decode": vae_decode_flops(w.grid),
            **({"tiny_decode": tiny_decode_flops(w.grid)} if w.decoder == "tiny" else {}),
            **({"clip": clip_flops(), "vae_encode": vae_encode_flops(w.frames, w.height, w.width)}
               if w.task == "i2v" else {}),
        },
        "sp_bytes_per_forward_per_rank": {**asdict(sp), "total": sp.total},
        "fsdp_bytes_per_forward_per_rank": fsdp_bytes_per_forward(arch, w.dtype, w.sp) if w.fsdp else 0,
        "cfg_gather_bytes_per_step_per_rank": (cfg_gather_bytes_per_step(w.grid, arch.out_dim)
                                               if w.cfg_parallel == 2 else 0),
        "memory_gb": {k: round(v / GB, 3) for k, v in asdict(mem).items()}
        | {"weights": round(mem.weights / GB, 3), "peak": round(mem.peak / GB, 3), "fits": mem.fits,
           "reserved": RESERVED_BYTES / GB, "causvid_sessions_per_gpu": mem.causvid_sessions},
        "seconds": {"gpu": proj.gpu, **{k: round(v, 3) for k, v in proj.stages.items()},
                    "dit_compute": round(proj.dit_compute_s, 3), "dit_comm": round(proj.dit_comm_s, 3),
                    "total": round(proj.total_s, 3), "videos_per_minute_per_replica": round(proj.videos_per_minute, 3)},
        "calibration": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(cal).items()}
        | {"calibrated_on": CALIBRATED_ON[gpu], "max_fit_error": round(fit.max_error, 4),
           "comm_eff_range": [round(c, 4) for c in fit.comm_range], "range_tolerance": RANGE_TOLERANCE,
           "dit_seconds_at_lowest_comm_eff": round(project(w, gpu, replace(cal, comm_eff=fit.comm_range[0])).dit_s, 3)},
    }
    out["vae"] = vae_json(w, gpu, cal)
    if w.fp8_compute:
        out["fp8_compute"] = fp8_compute_json(w, gpu, cal.mfu)
    if target_vpm is not None:
        n = replicas_for(target_vpm, proj)
        out["replicas"] = {"target_videos_per_minute": target_vpm, "replicas": n, "gpus": n * w.gpus}
    return out


def fp8_compute_json(w: Workload, gpu: str, mfu: float) -> dict:
    """The fp8 compute term of one video: the quantized GEMMs at the BF16 and the FP8 peak (both divided by
    the fitted MFU), the activation quantization that replaces the dequantization, and what it all saves."""
    f8, g = fp8_compute_forward(w, GPUS[gpu]), GPUS[gpu]
    n = w.steps * w.forwards_per_step
    gemm_bf16, gemm_fp8 = n * f8.bf16_s / mfu, n * f8.fp8_s / mfu
    return {"gemm_flops_per_forward_per_rank": f8.gemm_flops, "forwards": n,
            "bf16_peak_tflops": round(g.bf16_flops / 1e12, 1), "fp8_peak_tflops": round(g.fp8_flops / 1e12, 1),
            "gemm_s_bf16": round(gemm_bf16, 3), "gemm_s_fp8": round(gemm_fp8, 3),
            "activation_quant_s": round(n * f8.act_quant_s, 3), "dequant_s_replaced": round(n * f8.dequant_s, 3),
            "dit_s_saved": round(gemm_bf16 - gemm_fp8 + n * (f8.dequant_s - f8.act_quant_s), 3),
            "assumption": "the fp8 GEMMs reach the MFU fitted to Wan2.1's bf16 timings: uncalibrated for fp8 "
                          "(no published fp8 Wan2.1 timing)"}


def vae_mode(w: Workload) -> str:
    """The VAE mode in words: which decoder, and whether it is split over the SP ranks."""
    split = decode_split_of(w)
    if w.decoder == "tiny":
        return "tiny decoder (TAEHV) on rank 0"
    if split.ranks == 1 and w.gpus > 1:
        return "full decoder on rank 0 (--no-vae-parallel)" if not w.vae_parallel else \
            "full decoder whole on every rank (fewer latent rows than ranks)"
    if split.ranks == 1:
        return "full decoder on rank 0"
    return f"full decoder split over {split.ranks} ranks by latent rows (largest band {split.max_rows} of {split.rows})"


def _split_json(split: VaeSplit, compute_s: float, comm_s: float) -> dict:
    return {"ranks": split.ranks, "latent_rows": split.rows, "max_rows": split.max_rows,
            "fraction": round(split.fraction, 4), "halo_bytes": split.halo_bytes, "attention_gather_bytes":
            split.attn_bytes, "gather_bytes": split.gather_bytes, "halo_exchanges": split.convs,
            "compute_s": round(compute_s, 4), "comm_s": round(comm_s, 4)}


def vae_json(w: Workload, gpu: str, cal: Calibration) -> dict:
    """The decode (and I2V encode): mode, split, and its seconds by term (compute / vae_eff, bytes / comm_eff)."""
    g = GPUS[gpu]
    dec = vae_decode_terms(w, g)
    out = {"mode": vae_mode(w), "decoder": w.decoder, "vae_parallel": w.vae_parallel,
           "decode": _split_json(decode_split_of(w), dec.vae_s / cal.vae_eff, dec.comm_s / cal.comm_eff)}
    if w.decoder == "tiny":
        out["tiny_decoder"] = "priced from its FLOPs (model/tae.py's TAEHV, counted on meta) at the full VAE's " \
                              "fitted vae_eff: uncalibrated; its working memory is not modelled (the full " \
                              "decoder's is shown)"
    if w.task == "i2v":
        enc = vae_encode_terms(w, g)
        out["encode"] = _split_json(encode_split_of(w), enc.vae_s / cal.vae_eff, enc.comm_s / cal.comm_eff)
    return out


def _row_json(r: FitRow) -> dict:
    return {"task": r.task, "gpus": r.gpus, "published_s": r.published_s, "projected_s": round(r.projected_s, 1),
            "error": round(r.error, 4), "published_gb": r.published_gb, "projected_gb": round(r.projected_gb, 1),
            "memory_error": round(r.memory_error, 4)}


def calibration_json() -> dict:
    out = {}
    for gpu in sorted(set(CALIBRATED_ON.values())):
        fit = calibrate(gpu)
        c, link = fit.calibration, GPUS[gpu].link_bw
        out[gpu] = {
            "mfu": round(c.mfu, 4), "vae_eff": round(c.vae_eff, 4), "comm_eff": round(c.comm_eff, 4),
            "comm_gb_per_s": round(c.comm_eff * link / GB, 1),
            "comm_gb_per_s_range": [round(x * link / GB, 1) for x in fit.comm_range],
            "range_tolerance": RANGE_TOLERANCE, "vae_bytes_per_pixel": round(c.vae_bytes_per_pixel, 1),
            "source": c.source, "max_error": round(fit.max_error, 4),
            "points": [_row_json(r) for r in fit.rows],
            "t2v_only_fit_projecting_i2v": [_row_json(r) for r in held_out(gpu)],
        }
    out["calibrated_on"] = CALIBRATED_ON
    return out


def fit_table(gpu: str = "H100") -> str:
    lines = [f"| {gpu}: task, GPUs | published s | projected s | error | published peak GB | projected GB | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in calibrate(gpu).rows:
        lines.append(f"| {r.task.upper()}-14B, {r.gpus} | {r.published_s:.1f} | {r.projected_s:.1f} | {r.error:+.1%} "
                     f"| {r.published_gb:.1f} | {r.projected_gb:.1f} | {r.memory_error:+.1%} |")
    return "\n".join(lines)


def speed_table(gpu: str = "H100", target_vpm: float = 10.0) -> str:
    lines = [f"| 14B T2V 832x480, 81 frames | SP | DiT s | VAE s | total s | videos/min per replica "
             f"| GPUs for {target_vpm:g} videos/min |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, steps, cfg in (("distill: 4 steps, no CFG", 4, False), ("base: 50 steps, CFG", 50, True)):
        for sp in (1, 2, 4, 8):
            w = Workload(model="14B", steps=steps, cfg=cfg, ulysses=sp)
            p = project(w, gpu)
            gpus = replicas_for(target_vpm, p) * w.gpus
            lines.append(f"| {name} | {sp} | {p.dit_s:.1f} | {p.stages['vae']:.1f} | {p.total_s:.1f} "
                         f"| {p.videos_per_minute:.2f} | {gpus} |")
    return "\n".join(lines)


def causvid_table(gpu: str = "H100", node_gpus: int = 8) -> str:
    """Sessions per node: node_gpus replicas of SP 1, or one replica of SP node_gpus (rank 0 is the limit)."""
    lines = ["| CausVid, 832x480 (1560 tokens/frame) | DiT weights | window (latent frames) | SP | memory per "
             f"session (rank 0) | sessions per replica | sessions per {node_gpus}-GPU node |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, dtype, window in (("1.3B", "bf16", 21), ("1.3B", "bf16", 9), ("14B", "bf16", 21),
                                 ("14B", "int8", 21), ("14B", "int8", 9), ("14B", "fp8", 9)):
        for sp in (1, node_gpus):
            split = {"ring": sp} if model == "1.3B" else {"ulysses": sp}  # 12 heads: ring for 8 GPUs
            w = Workload(model=model, dtype=dtype, steps=4, cfg=False, causvid_window=window, **split)
            m = memory(w, gpu)
            lines.append(f"| {model} | {dtype} {m.dit_weights / GB:.1f} GB | {window} | {sp} "
                         f"| {m.causvid_session / GIB:.2f} GiB | {m.causvid_sessions} "
                         f"| {m.causvid_sessions * node_gpus // sp} |")
    return "\n".join(lines)


def readme_tables() -> str:
    fit, a100 = calibrate("H100"), calibrate("A100")
    c = fit.calibration
    link = GPUS["H100"].link_bw / GB
    lo, hi = (x * link for x in fit.comm_range)
    w8 = Workload(model="14B", steps=4, cfg=False, ulysses=8)
    distill8 = project(w8)
    split8, one_rank8 = decode_split_of(w8), project(replace(w8, vae_parallel=False))
    tiny8 = project(replace(w8, decoder="tiny"))
    split_comm = vae_decode_terms(w8, GPUS["H100"]).comm_s / c.comm_eff
    slow8 = project(w8, "H100", replace(c, comm_eff=fit.comm_range[0]))
    base8 = project(replace(w8, steps=50, cfg=True))
    held = held_out("H100")
    a100_with_h100_fit = [project(upstream_workload(p.gpus, t), "A100", c).total_s / p.seconds - 1
                          for t in ("t2v", "i2v") for p in WAN21_PUBLISHED[("A100", t)]]
    return "\n\n".join([
        f"Projected on H100 SXM (one replica = SP GPUs, Ulysses, bf16 weights replicated, T5 and VAE on "
        f"GPU; VAE decode split over the SP ranks by latent rows, on one rank at SP=1):\n\n{speed_table()}",
        f"4-step distill DiT at SP=8: {distill8.dit_s:.2f} s ({slow8.dit_s:.2f} s at the low end of the fitted "
        f"bandwidth range); base/distill: DiT time {base8.dit_s / distill8.dit_s:.1f}x, total "
        f"{base8.total_s / distill8.total_s:.1f}x. VAE decode at SP=8: {distill8.stages['vae']:.2f} s split "
        f"over {split8.ranks} ranks (largest band {split8.max_rows} of {split8.rows} latent rows; halos, "
        f"attention all-gather and pixel gather {split_comm * 1e3:.0f} ms of it), {one_rank8.stages['vae']:.2f} s "
        f"on one rank (`--no-vae-parallel`: total {one_rank8.total_s:.2f} s); the tiny decoder (`--decoder "
        f"tiny`, uncalibrated) {tiny8.stages['vae']:.2f} s on one rank.",
        f"CausVid sessions next to the weights (T5 and VAE resident, {RESERVED_BYTES / GB:.0f} GB reserved, "
        f"counted on rank 0, the busiest GPU of a replica; a session holds its share of the K/V of every layer "
        f"for the window (split over the SP group), its prompt's cross-attention K/V (on every rank) and the "
        f"streaming VAE decoder's state (fp32; split over the ranks by rows, rank 0's band). Idle sessions move "
        f"to CPU memory and free all of it):"
        f"\n\n{causvid_table()}",
        f"Calibration: least squares on Wan2.1's published H100 14B 720p times (T2V 50 and I2V 40 steps, CFG; "
        f"1 GPU with offload, 2/4/8 GPUs FSDP + Ulysses). MFU {c.mfu:.3f} of 989 TFLOP/s BF16; VAE "
        f"{c.vae_eff:.3f} of 495 TFLOP/s TF32; collectives at {c.comm_eff * link:.0f} GB/s per rank "
        f"({lo:.0f}-{hi:.0f} GB/s keep every point within {RANGE_TOLERANCE:.0%}); VAE decode working memory "
        f"{c.vae_bytes_per_pixel / 1e3:.1f} kB per output pixel, fitted to the 2/4/8-GPU T2V peaks (the 1-GPU "
        f"peaks check the activation formula).\n\n{fit_table('H100')}",
        f"Fitting the four T2V points alone reproduces them too but cannot tell serial VAE time from "
        f"collectives; projected with that fit, the I2V points come out "
        f"{min(r.error for r in held):+.1%} to {max(r.error for r in held):+.1%}. The A100 has its own fit "
        f"(Wan2.1's A800/A100 rows): MFU {a100.calibration.mfu:.2f}, collectives "
        f"{a100.calibration.comm_eff * GPUS['A100'].link_bw / GB:.0f} GB/s, max error "
        f"{a100.max_error:.1%}; with the H100's efficiencies the A100 points would come out "
        f"{min(a100_with_h100_fit):+.0%} to {max(a100_with_h100_fit):+.0%}. H200 projections use the "
        f"H100 fit; L40S projections use it too and are uncalibrated (no published Wan timing on Ada/PCIe).",
    ])
