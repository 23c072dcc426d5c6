"""tsld-estimate's command line: the table and --json, and bad input refused in one line."""
import json
import subprocess
import sys

import pytest
from helpers import REPO, tree_digest
from transformers import BertConfig, MambaConfig, T5Config

from tsld_ds.capacity.cli import main
from tsld_ds.errors import EXIT_USAGE

GiB = 1 << 30


def estimate_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_for_a_shipped_config(capsys):
    def plan_at(memory_gb):
        return estimate_json(capsys, "--model", "llama-2-7b", "--ds_config",
                             str(REPO / "ds_configs" / "zero3_bf16.json"), "--num_gpus", "8",
                             "--gradient_checkpointing", "--gpu_memory_gb", str(memory_gb))

    plan = plan_at(80)
    assert plan["student_params"] == plan["teacher_params"] == 6_738_415_616
    assert plan["dtype"] == "bfloat16" and plan["micro_batch"] == 4
    assert plan["total_bytes"] == sum(row["bytes"] for row in plan["rows"]
                                      if row["phase"] in ("held", plan["peak_phase"]))
    assert plan["fits"] is True
    assert plan["teacher_placement"].startswith("replicated")   # as launch/train.py would
    # Below that, the teacher is sharded, as launch/train.py would shard it; below the sharded
    # plan, nothing fits.
    sharded = plan_at(plan["total_bytes"] / GiB - 1)
    assert sharded["teacher_placement"].startswith("ZeRO-3")
    assert sharded["fits"] is True and sharded["total_bytes"] < plan["total_bytes"]
    assert plan_at(sharded["total_bytes"] / GiB - 0.5)["fits"] is False


def test_the_planner_names_zero2_when_the_student_fits_unsharded(capsys):
    small = estimate_json(capsys, "--num_gpus", "2", "--block_size", "128",
                          "--gpu_memory_gb", "80")
    assert small["zero2"]["fits"] is True
    assert small["zero2"]["total_bytes"] > small["total_bytes"]   # parameters whole, more bytes
    big = estimate_json(capsys, "--model", "llama-2-70b", "--num_gpus", "8", "--num_nodes", "4",
                        "--ds_config", str(REPO / "ds_configs" / "zero3_bf16.json"),
                        "--gradient_checkpointing", "--gpu_memory_gb", "80", "--no_teacher")
    assert big["zero2"]["fits"] is False
    assert main(["--num_gpus", "2", "--block_size", "128", "--gpu_memory_gb", "80"]) == 0
    table = capsys.readouterr().out
    assert "hint: the student fits unsharded: ZeRO stage 2 (ds_configs/zero2.json)" in table
    assert "teacher weights: replicated, ZeRO stage 0" in table


def test_table_for_a_shipped_model_name(capsys):
    assert main(["--model", "opt-6.7b", "--num_gpus", "2", "--block_size", "128",
                 "--gpu_memory_gb", "141"]) == 0
    out = capsys.readouterr().out
    assert "student model states" in out and "received per rank per micro-batch" in out
    assert out.startswith("student opt-6.7b (6.66B), teacher opt-6.7b (6.66B)")


def test_json_from_the_launch_script_as_a_user_runs_it():
    """launch/estimate.py in its own process: with --json, stdout is the JSON alone."""
    as_json = subprocess.run([sys.executable, str(REPO / "launch" / "estimate.py"), "--model",
                              "opt-6.7b", "--block_size", "128", "--json"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(as_json)["student_params"] == 6_658_473_984


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


@pytest.mark.parametrize("zero, extra, message", [
    ({"offload_param": {"device": "cpu"}}, {},
     "offload_param without offload_optimizer is not estimated"),
    ({}, {"activation_checkpointing": {"partition_activations": True}},
     "partition_activations splits checkpoints across tensor-parallel ranks"),
    ({}, {"train_batch_size": 24}, "train_batch_size 24 is not train_micro_batch_size_per_gpu 4 x "
                                   "gradient_accumulation_steps 1 x 8 rank(s) = 32"),
])
def test_config_that_training_refuses_is_refused(capsys, tmp_path, zero, extra, message):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(zero)
    config.update(extra)
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert main(["--ds_config", str(tmp_path / "ds.json"), "--num_gpus", "8"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_batch_sizes_are_checked_against_the_planned_gpus(capsys, tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["train_batch_size"] = 64   # micro-batch 4 x 2 accumulation x 8 GPUs
    del config["gradient_accumulation_steps"]
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert estimate_json(capsys, "--ds_config", str(tmp_path / "ds.json"),
                         "--num_gpus", "8")["micro_batch"] == 4


def test_checkpointing_refused_for_a_model_that_cannot(capsys, no_checkpointing_dir):
    assert main(["--model", str(no_checkpointing_dir), "--gradient_checkpointing"]) == EXIT_USAGE
    assert "does not support gradient checkpointing; drop --gradient_checkpointing" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    *[(["--gpu_memory_gb", value], f"--gpu_memory_gb must be a positive number of GiB, got "
                                   f"{float(value):g}") for value in ("nan", "inf", "-1", "0")],
    (["--block_size", "1"], "--block_size must be at least 2, got 1"),
    (["--num_gpus", "0"], "--num_gpus must be at least 1, got 0"),
    (["--loss_chunk_size", "0"], "--loss_chunk_size must be at least 1, got 0"),
], ids=["nan", "inf", "negative", "zero", "block_size", "num_gpus", "loss_chunk_size"])
def test_values_no_plan_can_be_made_with_are_one_line(capsys, argv, message):
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err == f"error: {message}\n"


BERT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


@pytest.mark.parametrize("config, refusal", [
    (MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=4),
     "the estimator models attention decoders; {what} '{path}' is a mamba"),
    (BertConfig(**BERT, architectures=["BertForMaskedLM"]),
     "{what} '{path}' is a BertForMaskedLM, not a causal LM (a *ForCausalLM or *LMHeadModel); "
     "tsld-ds takes causal LMs"),
    (BertConfig(**BERT), "{what} '{path}' is a bert encoder (is_decoder is false: it attends "
                         "both ways), not a causal LM; tsld-ds takes causal LMs"),
    (T5Config(vocab_size=97, d_model=32, d_ff=64, num_layers=2, num_heads=4),
     "{what} '{path}' is a t5 model, which transformers has no causal LM class for; tsld-ds "
     "takes causal LMs"),
    (BertConfig(**BERT, is_decoder=True, architectures=["BertLMHeadModel"]), None),
], ids=["mamba", "bert masked lm", "bert encoder", "t5", "bert decoder"])
@pytest.mark.parametrize("what", ["--model", "--teacher"])
def test_only_attention_causal_lms_are_estimated(capsys, tmp_path, config, refusal, what):
    """A config that is not a causal LM, or one without attention, is refused in one line,
    before any estimate (configs built here, never downloaded); a BERT made a decoder is a
    causal LM and is estimated."""
    path = tmp_path / "config"
    config.save_pretrained(path)
    before = tree_digest(tmp_path)
    code = main([what, str(path), "--num_gpus", "1", "--block_size", "32",
                 "--gpu_memory_gb", "80", "--json"])
    out, err = capsys.readouterr()
    if refusal is None:
        assert code == 0 and json.loads(out)["fits"] is True
    else:
        assert (code, out) == (EXIT_USAGE, "")
        assert err == f"error: {refusal.format(what=what, path=path)}\n"
    assert tree_digest(tmp_path) == before
