"""benchmarks/step_overhead.py in small: the plain loop, two plain loops side by side and
launch/train.py at 2 ranks (the 1-rank path is the same code), timed per phase (its figures:
docs/benchmarks.md)."""
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "step_overhead.py"
sys.path.insert(0, str(SCRIPT.parent))
import step_overhead  # noqa: E402

PHASES = ("teacher forward", "student forward + loss", "backward", "optimizer step", "other")


@pytest.mark.e2e
def test_every_variant_is_timed_per_phase(tmp_path):
    figures_path = tmp_path / "figures.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "3",
                          "--warmup", "1", "--ranks", "2", "--json", str(figures_path)],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True,
                         timeout=900).stdout
    summary = json.loads(figures_path.read_text())["summary"]
    assert list(summary) == ["plain", "plain x2", "zero3 r2"]
    for name, figures in summary.items():
        assert figures["tokens_per_s"] > 0, name
        # every phase was timed: the hooks wrapped launch/train.py's teacher, forward, backward
        # and step (a phase never entered would be 0)
        assert all(figures["phases_ms"][p] > 0 for p in PHASES[:4]), (name, figures)
    assert "zero3 r2" in out and "x plain" in out


@pytest.mark.parametrize("argv, message", [
    (["--memory", "--layers", "0"], "--layers must be at least 1, got 0"),
    (["--steps", "5", "--warmup", "5"], "--steps must exceed --warmup"),
])
def test_bad_options_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        step_overhead.parse_args(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
