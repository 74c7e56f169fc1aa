"""One command that runs every CUDA path of wanserve in minutes, for the first minutes of a lent GPU.

    python benchmarks/gpu_check.py --out out/gpu_check          # on the GPU machine (<= 8 min on one GPU)
    python benchmarks/gpu_check.py --device cpu --out /tmp/gc    # the dry run the test suite runs

Rows: the environment; the DiT in bf16 on the device vs fp32 on the CPU; each attention kernel vs float64
attention; int8 / fp8 linears vs their dequantized reference, scaled fp8 GEMMs vs bf16; torch.compile vs
eager; the Serve app with the demo model (a T2V job and a 2-fragment session); a Wan2.1-1.3B- and a
14B-shaped DiT with random bf16 weights at 480p x 81 frames: seconds for a 4-step denoise and one CFG
step, TFLOP/s and MFU from the capacity model's FLOP count, beside the published peer figures. A row
that cannot run here says why (status "skip"); a row that runs and misses its bound is "fail". Prints
the JSON and writes gpu_check.json and gpu_check.md to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capacity.flops import dit_forward_flops  # noqa: E402
from capacity.hardware import GPUS  # noqa: E402
from model.archs import WAN21_T2V_1_3B, WAN21_T2V_14B, DiTArch  # noqa: E402
from model.compile import TOLERANCE as COMPILE_TOL  # noqa: E402
from model.compile import compile_dit  # noqa: E402
from model.dit import WanModel  # noqa: E402
from model.kernels import KERNEL_NAMES, KernelError, attention, resolve_kernel  # noqa: E402
from model.quant import QuantLinear, check_fp8_compute, set_fp8_compute  # noqa: E402
from model.validation import ConfigError  # noqa: E402
from parallel.group import free_port  # noqa: E402

# bf16 has an 8-bit mantissa (relative rounding 2^-9 per op); two layers of linears, norms and attention
# stay well inside 2 %. Sage attention quantizes Q/K to int8: 5 %.
BF16_REL = 2e-2
SAGE_REL = 5e-2
# fp8 e4m3 rounds weights and activations to 2^-4 relative each: rms error ~ sqrt(2) * 2^-4 / sqrt(3) = 0.051
FP8_REL = 6e-2
PACKAGES = ("flash_attn", "flash_attn_interface", "sageattention", "xfuser", "yunchang", "triton")
# ../shared/reference/peers.md §3-4: published seconds, Wan2.1-14B 480p x 81 frames
PEERS = {"LightX2V I2V-14B-480P, 40 steps + CFG, 1xH100": "5.18 s/step",
         "LightX2V same, 8xH100": "0.75 s/step",
         "LightX2V fp8, no CFG, 8xH100": "0.35 s/step (about 1.4 s for 4 steps)"}
SMALL = DiTArch(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=256, text_dim=64,
                text_len=32)  # release head_dim 128, two layers: every code path, seconds to run


@dataclass
class Row:
    name: str
    status: str = "pass"  # pass | fail | skip
    detail: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


class Skip(Exception):
    """This row cannot run here; the message says why."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def synced(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Best wall seconds of `repeats` calls after one warm-up call."""
    fn()
    synced(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synced(device)
        best = min(best, time.perf_counter() - t0)
    return best


def random_dit(arch: DiTArch, device, dtype, seed: int = 0) -> WanModel:
    """Random weights (no download); on the meta device first so a 14B model never exists on the CPU."""
    with torch.device("meta"):
        model = WanModel(arch)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g) if p.dim() > 1 else p.uniform_(-0.05, 0.05, generator=g)
    return model.eval().requires_grad_(False)


def bf16_linear(seed: int) -> tuple[torch.nn.Linear, torch.Generator]:
    """A 512 -> 1024 bf16 linear with weights of std 0.05, and the generator to draw its inputs from."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(512, 1024).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 512, generator=g) * 0.05)
    return lin, g


def dit_inputs(arch: DiTArch, grid: tuple[int, int, int], device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return {"x": torch.randn(1, arch.out_dim, f, h, w, generator=g).to(device),
            "t": torch.tensor([937.5], device=device),
            "context": torch.randn(1, arch.text_len, arch.text_dim, generator=g).to(device)}


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------
def check_environment(device: torch.device, opts) -> Row:
    figs = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        figs["gpu"] = torch.cuda.get_device_name(device)
        figs["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        figs["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    for pkg in PACKAGES:
        if importlib.util.find_spec(pkg) is None:
            figs[pkg] = None
        else:
            try:
                figs[pkg] = getattr(__import__(pkg), "__version__", "installed")
            except Exception as e:  # a package that is there but does not import is itself a finding
                figs[pkg] = f"import failed: {type(e).__name__}: {e}"[:200]
    return Row("environment", detail=figs.get("gpu", "no GPU: CPU dry run"), figures=figs)


def check_dit_bf16(device: torch.device, opts) -> Row:
    cpu = random_dit(SMALL, "cpu", torch.float32)
    kw = dit_inputs(SMALL, (3, 8, 8), "cpu")
    with torch.no_grad():
        ref = cpu(**kw)
        out = cpu.to(device, torch.bfloat16)(**{k: v.to(device) for k, v in kw.items()})
    err = rel_err(out, ref)
    ok = err <= BF16_REL
    return Row("dit_bf16_vs_cpu_fp32", "pass" if ok else "fail", f"relative error {err:.2e} (bound {BF16_REL})",
               {"rel_err": err})


def check_kernel(name: str):
    def run(device: torch.device, opts) -> Row:
        try:
            kernel = resolve_kernel(name, device, torch.bfloat16)
        except KernelError as e:
            raise Skip(str(e)) from None
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 300, 4, 128, generator=g) for _ in range(3))
        mask = torch.rand(2, 300, generator=g) > 0.3
        ref = attention(q.double(), k.double(), v.double())
        ref_masked = attention(q.double(), k.double(), v.double(), key_mask=mask)
        qd, kd, vd = (t.to(device, torch.bfloat16) for t in (q, k, v))
        errs = {"rel_err": rel_err(kernel(qd, kd, vd), ref),
                "rel_err_masked": rel_err(kernel(qd, kd, vd, mask.to(device)), ref_masked)}
        if kernel.has_lse:
            _, lse = kernel.with_lse(qd, kd, vd)
            s = (q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)) / math.sqrt(128)
            errs["lse_abs_err"] = float((lse.double().cpu() - torch.logsumexp(s, -1)).abs().max())
        bound = SAGE_REL if name.startswith("sage") else BF16_REL
        ok = errs["rel_err"] <= bound and errs["rel_err_masked"] <= bound and errs.get("lse_abs_err", 0) <= 1e-2
        figs = dict(errs)
        if device.type == "cuda":  # one 1.3B-shaped self-attention of a 480p x 81 video (32,760 tokens)
            q = torch.randn(1, 32760, 12, 128, device=device, dtype=torch.bfloat16)
            sec = timed(lambda: kernel(q, q, q), device)
            figs.update(ms=round(sec * 1e3, 2), tflops=round(4 * 32760 ** 2 * 12 * 128 / sec / 1e12, 1))
        return Row(f"attention_{name}", "pass" if ok else "fail", f"vs float64 (bound {bound})", figs)
    return run


def check_quant(scheme: str):
    def run(device: torch.device, opts) -> Row:
        if scheme == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise Skip("fp8 tensors need compute capability 8.9+")
        lin, g = bf16_linear(4)
        q = QuantLinear.from_linear(lin, scheme).to(device)
        x = torch.randn(64, 512, generator=g).to(device, torch.bfloat16)
        ref = torch.nn.functional.linear(x.double(), q.dequantize(torch.float64), q.bias.double())
        err = rel_err(q(x), ref)
        ok = err <= BF16_REL
        return Row(f"quant_{scheme}", "pass" if ok else "fail",
                   f"weight-only {scheme} vs its dequantized float64 product (bound {BF16_REL})", {"rel_err": err})
    return run


def check_fp8_gemm(device: torch.device, opts) -> Row:
    """Scaled fp8 GEMMs (per-token activation, per-channel weight scales) vs the unquantized bf16 linear;
    on CUDA also timed against dequantize-then-bf16 at a 14B FFN shape."""
    try:
        check_fp8_compute("scaled_mm", device)
    except ConfigError as e:
        raise Skip(str(e)) from None
    lin, g = bf16_linear(5)
    model = torch.nn.Sequential(QuantLinear.from_linear(lin, "fp8")).to(device)
    mode = set_fp8_compute(model, "scaled_mm", device)
    x = torch.randn(64, 512, generator=g).to(device, torch.bfloat16)
    err = rel_err(model(x), torch.nn.functional.linear(x.double().cpu(), lin.weight.double(), lin.bias.double()))
    figs = {"mode": mode, "rel_err_vs_unquantized": err}
    if device.type == "cuda":  # 14B FFN up-projection over one rank's tokens at SP=8
        big = torch.nn.Linear(5120, 13824, device=device, dtype=torch.bfloat16)
        xb = torch.randn(4096, 5120, device=device, dtype=torch.bfloat16)
        q = torch.nn.Sequential(QuantLinear.from_linear(big, "fp8"))
        with torch.no_grad():
            figs["bf16_ms"] = round(timed(lambda: big(xb), device) * 1e3, 3)
            set_fp8_compute(q, "dequant", device)
            figs["dequant_ms"] = round(timed(lambda: q(xb), device) * 1e3, 3)
            set_fp8_compute(q, "scaled_mm", device)
            figs["scaled_mm_ms"] = round(timed(lambda: q(xb), device) * 1e3, 3)
        figs["speedup_vs_bf16"] = round(figs["bf16_ms"] / figs["scaled_mm_ms"], 2)
    ok = err <= FP8_REL
    return Row("fp8_scaled_gemm", "pass" if ok else "fail", f"vs the unquantized bf16 linear (bound {FP8_REL})", figs)


def check_compile(device: torch.device, opts) -> Row:
    """Regional torch.compile (model/compile.py) vs eager on the small DiT in the device's compute dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_dit(SMALL, device, dtype)
    kw = dit_inputs(SMALL, (3, 16, 16), device)
    with torch.no_grad():
        eager = model(**kw)
        eager_s = timed(lambda: model(**kw), device)
        compile_dit(model)
        t0 = time.perf_counter()
        compiled = model(**kw)
        synced(device)
        compile_s = time.perf_counter() - t0
        compiled_s = timed(lambda: model(**kw), device)
    err = float((compiled.float() - eager.float()).abs().max())
    bound = COMPILE_TOL if dtype == torch.float32 else BF16_REL * float(eager.float().abs().max())
    return Row("compile", "pass" if err <= bound else "fail",
               f"compiled vs eager max abs {err:.2e} (bound {bound:.1e})",
               {"max_abs": err, "compile_s": round(compile_s, 1), "speedup": round(eager_s / compiled_s, 3)})


def check_big_dit(arch: DiTArch, label: str):
    def run(device: torch.device, opts) -> Row:
        if device.type != "cuda":
            raise Skip("CUDA only: a release-size DiT at 480p x 81 frames takes hours on a CPU")
        torch.cuda.empty_cache()  # the previous row's model is gone with its frame
        grid = (21, 60, 104)  # latent of 832x480 x 81 frames
        model = random_dit(arch, device, torch.bfloat16)
        kw = dit_inputs(arch, grid, device)
        null = {**kw, "context": torch.zeros_like(kw["context"])}
        with torch.no_grad():
            step = timed(lambda: model(**kw), device, repeats=2)
            cfg_step = timed(lambda: (model(**kw), model(**null)), device, repeats=1)
        flops = dit_forward_flops(arch, (grid[0], grid[1] // 2, grid[2] // 2)).total
        name = torch.cuda.get_device_name(device)
        gpu = next((g for key, g in GPUS.items() if key in name.replace(" ", "")), None)
        figs = {"forward_s": round(step, 3), "denoise_4step_no_cfg_s": round(4 * step, 2),
                "cfg_step_s": round(cfg_step, 2), "tflops": round(flops / step / 1e12, 1),
                "dit_flops_per_forward": flops, "peers": PEERS}
        if gpu is not None:
            figs["mfu"] = round(flops / step / gpu.bf16_flops, 3)
        return Row(f"dit_{label}_480p", detail=f"{name}: 4 steps {4 * step:.2f} s, CFG step {cfg_step:.2f} s",
                   figures=figs)
    return run


def check_serve(device: torch.device, opts) -> Row:
    """The demo app on this device: `python -m deployments.demo` sends a T2V job and a 2-fragment session."""
    out = Path(opts.out) / "serve"
    cmd = [sys.executable, "-m", "deployments.demo", "--device", device.type, "--out", str(out),
           "--port", str(free_port("127.0.0.1"))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=opts.serve_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    videos = sorted(p.name for p in out.glob("*.mp4"))
    want = {"demo_t2v.mp4", "demo_session_fragment1.mp4", "demo_session_fragment2.mp4", "demo_session.mp4"}
    ok = proc.returncode == 0 and want <= set(videos)
    detail = f"exit {proc.returncode}, videos {videos}"
    if not ok:
        detail += " | " + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    return Row("serve_demo", "pass" if ok else "fail", detail,
               {"wall_s": round(time.perf_counter() - t0, 1), "output": lines[-12:]})


ROWS = {
    "environment": check_environment,
    "dit_bf16": check_dit_bf16,
    **{f"attention_{n}": check_kernel(n) for n in KERNEL_NAMES},
    "quant_int8": check_quant("int8"),
    "quant_fp8": check_quant("fp8"),
    "fp8_gemm": check_fp8_gemm,
    "compile": check_compile,
    "serve": check_serve,
    "dit_1.3B": check_big_dit(WAN21_T2V_1_3B, "1.3B"),
    "dit_14B": check_big_dit(WAN21_T2V_14B, "14B"),
}


def run_rows(device: torch.device, opts) -> list[Row]:
    rows = []
    for key, fn in ROWS.items():
        if key in opts.skip:
            rows.append(Row(key, "skip", "skipped by --skip"))
            continue
        t0 = time.perf_counter()
        try:
            row = fn(device, opts)
        except Skip as e:
            row = Row(key, "skip", str(e))
        except Exception as e:  # a failing row is the finding: record it and go on to the next one
            row = Row(key, "fail", f"{type(e).__name__}: {e}"[:500], {"traceback": traceback.format_exc()[-2000:]})
        row.seconds = round(time.perf_counter() - t0, 2)
        print(f"[gpu_check] {row.name}: {row.status} ({row.seconds} s) {row.detail[:160]}", file=sys.stderr)
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(rows: list[Row], device: str) -> str:
    lines = [f"gpu_check on {device}", "", "| check | status | s | detail | figures |", "|---|---|---:|---|---|"]
    for r in rows:
        figs = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items() if k not in ("traceback", "output", "peers"))
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {r.detail.replace('|', '/')} | {figs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="cuda (default when there is one) or cpu (the dry run)")
    ap.add_argument("--out", default=str(REPO / "out" / "gpu_check"))
    ap.add_argument("--skip", nargs="*", default=[], choices=list(ROWS), help="rows not to run")
    ap.add_argument("--serve-timeout", type=float, default=300.0)
    opts = ap.parse_args(argv)
    if opts.device is None:
        ap.error("no CUDA device here: pass --device cpu for the dry run")
    device = torch.device(opts.device)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = run_rows(device, opts)
    report = {"device": str(device), "rows": [asdict(r) for r in rows],
              "passed": sum(r.status == "pass" for r in rows), "failed": sum(r.status == "fail" for r in rows),
              "skipped": sum(r.status == "skip" for r in rows)}
    (Path(opts.out) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (Path(opts.out) / "gpu_check.md").write_text(markdown(rows, rows[0].detail if rows else str(device)))
    print(json.dumps(report, default=str))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
