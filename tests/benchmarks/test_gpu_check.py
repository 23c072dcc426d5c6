"""benchmarks/gpu_check.py --dry-run: every stage of the GPU check runs at tiny sizes on the CPU
(what needs CUDA is skipped, saying so), so the script is known to work before a GPU is at hand."""
import json
import math
import subprocess
import sys

from helpers import REPO

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert list(stages) == ["kernels", "losses", "default", "loss_memory", "kernel_bench",
                            "llama_1b"]
    assert stages["kernels"]["status"] == "skipped"
    assert stages["kernels"]["kernels_info"]["sources"] is not None
    assert stages["kernels"]["tests"]["skipped"] > 0 and "CUDA" in stages["kernels"]["reason"]
    assert stages["losses"]["status"] == "passed" and stages["losses"]["tests"]["passed"] > 0
    for precision in ("fp32", "bf16"):
        summary = stages["default"][precision]
        assert summary["steps"] == 2 and math.isfinite(summary["student_ppl_after"])
    [case] = stages["loss_memory"]["cases"]
    assert case["memory_ratio"] > 1 and case["fused_seconds"] > 0
    assert stages["kernel_bench"]["status"] == "skipped"
    assert "CUDA" in stages["kernel_bench"]["reason"]
    llama = stages["llama_1b"]
    assert llama["status"] == "passed" and llama["tokens_per_s_steady"] > 0
    assert llama["mfu"] is None and 1e5 < llama["parameters"] < 1e7  # the tiny stand-in
    assert llama["memory_peak_mib"] is None and llama["memory_estimate_mib"] > 0  # no nvidia-smi
    log = (out / "log.txt").read_text()
    assert all(f"=== {name} ===" in log for name in stages)


def test_unknown_stage_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--stages", "kernels,gpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown ['gpu']" in proc.stderr
    assert not (tmp_path / "report.json").exists()
