"""tsld-estimate's command line: the table and --json, and bad input refused in one line."""
import json
import subprocess
import sys

import pytest

from helpers import REPO
from tsld_ds.capacity.cli import main
from tsld_ds.errors import EXIT_USAGE

GiB = 1 << 30


def estimate_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_for_a_shipped_config(capsys):
    plan = estimate_json(capsys, "--model", "llama-2-7b", "--ds_config",
                         str(REPO / "ds_configs" / "zero3_bf16.json"), "--num_gpus", "8",
                         "--gradient_checkpointing", "--gpu_memory_gb", "80")
    assert plan["student_params"] == plan["teacher_params"] == 6_738_415_616
    assert plan["dtype"] == "bfloat16" and plan["micro_batch"] == 4
    assert plan["total_bytes"] == sum(row["bytes"] for row in plan["rows"]
                                      if row["phase"] in ("held", plan["peak_phase"]))
    assert plan["fits"] is True
    tight = estimate_json(capsys, "--model", "llama-2-7b", "--ds_config",
                          str(REPO / "ds_configs" / "zero3_bf16.json"), "--num_gpus", "8",
                          "--gpu_memory_gb", str(plan["total_bytes"] / GiB - 1),
                          "--gradient_checkpointing")
    assert tight["fits"] is False


def test_table_from_the_launch_script():
    out = subprocess.run([sys.executable, str(REPO / "launch" / "estimate.py"), "--model",
                          "opt-6.7b", "--num_gpus", "2", "--block_size", "128",
                          "--gpu_memory_gb", "141"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "student model states" in out and "received per rank per micro-batch" in out
    assert "student /" in out and "(6.66B), teacher" in out
    as_json = subprocess.run([sys.executable, str(REPO / "launch" / "estimate.py"), "--model",
                              "opt-6.7b", "--block_size", "128", "--json"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(as_json)["student_params"] == 6_658_473_984   # stdout is JSON alone


@pytest.mark.parametrize("argv, message", [
    (["--model", "no/such-model-here"], "cannot read the config of --model 'no/such-model-here'"),
    (["--model", "llama-2-70b", "--num_gpus", "2", "--gpu_memory_gb", "80"],
     "sharded model states alone need 643.4 GiB per GPU, more than --gpu_memory_gb 80: use "
     "more GPUs (--num_gpus, --num_nodes) or offload the optimizer"),
    (["--ds_config", "/no/such/config.json"], "/no/such/config.json"),
])
def test_bad_input_is_one_line(capsys, argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_checkpointing_refused_for_a_model_that_cannot(capsys, no_checkpointing_dir):
    assert main(["--model", str(no_checkpointing_dir), "--gradient_checkpointing"]) == EXIT_USAGE
    assert "does not support gradient checkpointing; drop --gradient_checkpointing" in \
        capsys.readouterr().err
