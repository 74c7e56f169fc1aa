"""The CPU dry run of benchmarks/gpu_check.py: every row that can run on a CPU runs and passes (the Serve
demo included, in its own Ray instance); the CUDA-only rows are skipped saying why; JSON and markdown
are written."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_ONLY = {"attention_flash_attn2", "attention_flash_attn3", "attention_sage_attn2", "dit_1.3B", "dit_14B"}


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    skipped = {n for n, r in rows.items() if r["status"] == "skip"}
    assert {n.replace("_480p", "") for n in skipped} == CUDA_ONLY, skipped
    for name in skipped:
        assert "CUDA" in rows[name]["detail"], rows[name]  # the reason, not just "skip"
    assert report["failed"] == 0 and all(r["status"] == "pass" for n, r in rows.items() if n not in skipped)
    assert rows["dit_bf16_vs_cpu_fp32"]["figures"]["rel_err"] < 2e-2
    assert rows["attention_torch_sdpa"]["figures"]["lse_abs_err"] < 1e-2
    assert rows["serve_demo"]["figures"]["wall_s"] > 0 and "demo_t2v.mp4" in rows["serve_demo"]["detail"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "| attention_flash_attn3 | skip |" in table
