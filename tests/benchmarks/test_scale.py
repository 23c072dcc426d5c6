"""benchmarks/scale.py in small: tsld-estimate against the measured memory of a 1-layer, short-
block slice at 1 and 2 ranks (the 7B-width, block-2048 figures are docs/benchmarks.md's)."""
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "scale.py"


@pytest.mark.e2e
def test_estimate_near_measured_memory(tmp_path):
    figures_path = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--hidden_size", "1024",
                    "--intermediate_size", "2752", "--heads", "8", "--block_size", "256",
                    "--steps", "2", "--output_root", str(tmp_path), "--json", str(figures_path)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    figures = json.loads(figures_path.read_text())
    held = {}
    for run in figures["runs"]:
        estimate = run["estimate"]
        for rank in run["per_rank"]:
            assert 0.75 <= rank["peak_bytes"] / estimate["total_bytes"] <= 1.3, (run, rank)
            assert 0.75 <= rank["held_bytes"] / estimate["held_bytes"] <= 1.3, (run, rank)
        held[run["ranks"]] = max(r["held_bytes"] for r in run["per_rank"]) \
            - run["runtime_bytes"]
    # The states halve; at this size the bucket, gloo's buffers and the allocator do not
    # (measured 0.60-0.70); unsharded states would give about 1.
    assert 0.45 <= held[2] / held[1] <= 0.8
