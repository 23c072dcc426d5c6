"""benchmarks/gpu_check.py: its parts, and --dry-run end to end at tiny sizes on the CPU (what
needs CUDA skipped, saying so), so the script is known to work before a GPU is at hand. The
kernels and losses stages run pytest themselves: the suite runs their tests directly, and here
only how a stage reads pytest's result."""
import json
import math
import subprocess
import sys

import pytest
from helpers import REPO

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(GPU_CHECK.parent))
import gpu_check  # noqa: E402


@pytest.mark.e2e
def test_dry_run_runs_every_stage_but_the_pytest_ones(tmp_path):
    out = tmp_path / "gpu_check"
    stages = ["default", "loss_memory", "kernel_bench", "llama_1b"]
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--stages",
                           ",".join(stages), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())["stages"]
    assert list(report) == stages
    summary = report["default"]["fp32"]
    assert summary["steps"] == 2 and math.isfinite(summary["student_ppl_after"])
    [case] = report["loss_memory"]["cases"]
    assert case["memory_ratio"] > 1 and case["fused_seconds"] > 0
    assert report["kernel_bench"]["status"] == "skipped"
    assert "CUDA" in report["kernel_bench"]["reason"]
    llama = report["llama_1b"]
    assert llama["status"] == "passed" and llama["tokens_per_s_steady"] > 0
    assert llama["mfu"] is None and 1e5 < llama["parameters"] < 1e7  # the tiny stand-in
    assert llama["memory_peak_mib"] is None and llama["memory_estimate_mib"] > 0  # no nvidia-smi
    log = (out / "log.txt").read_text()
    assert all(f"=== {name} ===" in log for name in stages)


def test_a_pytest_stage_reads_the_counts_and_fails_on_a_failure(tmp_path):
    """run_pytest: pytest's closing line read into counts; exit 5 (nothing collected) passes,
    a failed test or an error fails the stage."""
    class Finished(gpu_check.Check):
        def __init__(self, code: int, last_line: str):
            super().__init__(tmp_path, dry_run=True)
            self.result = subprocess.CompletedProcess([], code, f"....\n{last_line}\n", "")

        def run(self, name, cmd, timeout):
            assert cmd[1:3] == ["-m", "pytest"]
            return self.result

    assert gpu_check.run_pytest(Finished(0, "12 passed, 3 skipped in 4.20s"), "x", [], 1) == \
        {"passed": 12, "skipped": 3}
    assert gpu_check.run_pytest(Finished(5, "1 deselected in 0.1s"), "x", [], 1) == \
        {"deselected": 1}
    for code, line in ((1, "1 failed, 4 passed in 1.0s"), (1, "2 passed, 1 error in 1.0s"),
                       (2, "")):
        with pytest.raises(gpu_check.StageFailed):
            gpu_check.run_pytest(Finished(code, line), "x", [], 1)


def test_the_kernel_tests_it_names_exist():
    assert all((REPO / path).is_file() for path in gpu_check.KERNEL_TESTS)


def test_unknown_stage_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.parse_args(["--dry-run", "--stages", "kernels,gpu"])
    assert stopped.value.code == 2 and "unknown ['gpu']" in capsys.readouterr().err


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA L4", 121.0)])
def test_bf16_peaks_match_the_most_specific_name(name, peak):
    assert next(p for fragment, p in gpu_check.BF16_PEAK_TFLOPS if fragment in name) == peak
