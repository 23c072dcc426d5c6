"""benchmarks/quant_memory.py in small: every variant in its own process, an earlier checkout's
layers beside this one's (its figures: docs/benchmarks.md)."""
import subprocess
import sys

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "quant_memory.py"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          cwd=REPO)


def test_each_layer_is_measured_against_the_weight():
    result = run("--out_features", "96", "--in_features", "64", "--tokens", "8", "--repeats", "1",
                 "--methods", "linear", "twn", "--before", str(REPO))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["linear", "now"], ["twn", "now"], ["twn", "before"]]
    assert all(float(row[2]) >= 0 for row in rows)


def test_bad_options_are_refused_in_one_line(tmp_path):
    for argv, message in ((["--tokens", "0"], "must be at least 1"),
                          (["--before", str(tmp_path)], "is not a tsld-ds checkout")):
        result = run(*argv)
        assert result.returncode == 2
        assert message in result.stderr.strip().splitlines()[-1]
