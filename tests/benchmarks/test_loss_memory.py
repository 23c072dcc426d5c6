"""benchmarks/loss_memory.py in small: both implementations, each in its own process (its
figures: docs/benchmarks.md)."""
import json
import subprocess
import sys

from helpers import REPO


def test_both_implementations_are_measured(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loss_memory.py"),
                             "--cases", "64x128", "--hidden", "32", "--seq-len", "16",
                             "--repeats", "1", "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    [case] = json.loads(out.read_text())
    assert (case["tokens"], case["vocab"], case["hidden"]) == (64, 128, 32)
    for impl in ("naive", "fused"):
        assert case[f"{impl}_added_peak_mib"] >= 0 and case[f"{impl}_seconds"] > 0
