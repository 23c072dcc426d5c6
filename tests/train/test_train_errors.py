"""Bad input gets one clear message and exit code 2 before any model loads and before anything
is written. launch/train.py's main() runs in this process (`in_process`); one test runs the script
as a user does."""
import os
import socket
import subprocess
from types import SimpleNamespace

import pytest
from helpers import (
    run_train,
    save_tiny_model,
    small_filesystem,
    tiny_llama_config,
    tree_digest,
    write_ds_config,
)

from tsld_ds.errors import EXIT_CODES, EXIT_USAGE
from tsld_ds.models import check_block_size
from tsld_ds.train.cli import main as train_main


@pytest.fixture
def run_main(in_process, capsys):
    """launch/train.py's main(argv) in this process: its exit code (argparse's SystemExit
    included) and what it printed."""
    def run(argv):
        try:
            code = train_main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def assert_refused(proc, *fragments):
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.e2e
def test_missing_model_path_as_a_user_sees_it(tmp_path):
    """The script in its own process: exit 2, the one line, nothing written."""
    proc = run_train(["--model", tmp_path / "nope", "--output_dir", tmp_path / "out"],
                     ranks=0, check=False)
    assert_refused(proc, "does not exist")
    assert [line for line in proc.stderr.splitlines() if line.strip()] == \
        [f"error: --model path '{tmp_path / 'nope'}' does not exist"]
    assert not (tmp_path / "out").exists()


def test_unparsable_deepspeed_config(tmp_path, run_main):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 2,,}')
    proc = run_main(["--ds_config", bad, "--output_dir", tmp_path / "out"])
    assert_refused(proc, "is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_three_bits_is_refused(tmp_path, run_main):
    proc = run_main(["--bits", "3", "--output_dir", tmp_path / "out"])
    assert proc.returncode == 2 and "invalid choice: 3" in proc.stderr


def test_dataset_shorter_than_one_block(tiny_llama_dir, tmp_path, run_main):
    data = tmp_path / "tiny"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.txt").write_text("In the beginning.\n")
    proc = run_main(["--model", tiny_llama_dir, "--dataset", data,
                     "--ds_config", write_ds_config(tmp_path / "ds.json"),
                     "--output_dir", tmp_path / "out"])
    assert_refused(proc, "fewer than one block")
    assert not (tmp_path / "out").exists()


def test_teacher_with_another_vocabulary(tiny_llama_dir, builtin_tokenizer, small_corpus_dir,
                                         tmp_path, run_main):
    other = save_tiny_model(tmp_path / "other",
                            tiny_llama_config(len(builtin_tokenizer) + 8), builtin_tokenizer)
    proc = run_main(["--model", tiny_llama_dir, "--teacher", other, "--dataset", small_corpus_dir,
                     "--ds_config", write_ds_config(tmp_path / "ds.json"),
                     "--output_dir", tmp_path / "out"])
    assert_refused(proc, "vocabularies differ")
    assert not (tmp_path / "out").exists()


def test_existing_run_is_not_overwritten(tiny_llama_dir, tmp_path, run_main):
    out = tmp_path / "out"
    (out / "checkpoints" / "step_0000005").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_0000005\n")
    proc = run_main(["--model", tiny_llama_dir, "--output_dir", out])
    assert_refused(proc, "already holds a run")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000005"]


def test_help_lists_every_option_with_its_true_default_once_and_the_exit_codes(run_main):
    proc = run_main(["--help"])
    assert proc.returncode == 0
    for option in ("--model", "--teacher", "--dataset", "--dataset_config", "--block_size",
                   "--bits", "--quant_method", "--granularity", "--group_size", "--kd",
                   "--kd_temperature", "--lr", "--epochs", "--max_steps", "--eval_every",
                   "--save_every", "--keep_checkpoints", "--output_dir", "--resume", "--seed",
                   "--ds_config"):
        assert option in proc.stdout
    entries = {}  # option -> its help text, from the "  --option" line to the next one
    for line in proc.stdout.split("exit codes:")[0].splitlines():
        if line.startswith("  --"):
            option = line.split()[0]
            entries[option] = line
        elif line.startswith(" " * 8) and entries:
            entries[option] += " " + line.strip()
    assert all(entry.count("(default") <= 1 for entry in entries.values()), \
        [e for e in entries.values() if e.count("(default") > 1]
    assert "(default: 300 when --epochs is not given" in " ".join(entries["--max_steps"].split())
    assert "(default: None)" not in proc.stdout
    codes = proc.stdout.split("exit codes:")[1]
    assert all(f"  {code} " in codes for code in EXIT_CODES)


def test_gpu_options_without_the_gpu_extra_name_it(tiny_llama_dir, small_corpus_dir, tmp_path,
                                                   run_main):
    for option in (["--attn_implementation", "flash_attention_2"], ["--optimizer", "adamw_8bit"]):
        proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir, *option,
                        "--ds_config", write_ds_config(tmp_path / "ds.json"),
                        "--output_dir", tmp_path / "out"])
        assert_refused(proc, option[0])
        assert "CUDA GPU" in proc.stderr or ".[gpu]" in proc.stderr


def test_token_scale_needs_tsld(tmp_path, run_main):
    proc = run_main(["--kd", "logit", "--token_scale", "uniform", "--output_dir",
                    tmp_path / "out"])
    assert proc.returncode == 2 and "--token_scale weighs the TSLD term" in proc.stderr


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--resume", "latest", "--overwrite_output_dir", "--output_dir",
                    str(tmp_path / "out")])
    assert exit_info.value.code == EXIT_USAGE
    assert "--resume continues a run and --overwrite_output_dir starts a new one" in \
        capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--log_every", "0", "--log_every must be positive, got 0"),
    ("--lr", "-1", "--lr must be positive, got -1.0"),
    ("--kd_temperature", "0", "--kd_temperature must be positive, got 0.0"),
    ("--save_every", "-1", "--save_every must be 0 or more, got -1"),
    ("--eval_train_blocks", "-2", "--eval_train_blocks must be 0 or more, got -2"),
    ("--keep_checkpoints", "0", "--keep_checkpoints must be positive, got 0"),
    ("--group_size", "64", "only meaningful with granularity='group'"),
])
def test_options_out_of_range(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([option, value, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,message", [
    ({"train_batch_size": 16}, "train_batch_size 16 is not train_micro_batch_size_per_gpu 2 x "
                               "gradient_accumulation_steps 1 x 1 rank(s) = 2"),
    ({"optimizer": {"type": "Adamm", "params": {}}}, "unknown optimizer type 'Adamm'"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a whole number"),
    ({"activation_checkpointing": {"partition_activations": True}},
     "partition_activations splits checkpoints across tensor-parallel ranks, which tsld-ds does "
     "not use; drop it"),
    ({"activation_checkpointing": {"cpu_checkpointing": True}},
     "cpu_checkpointing acts on checkpointed blocks; add --gradient_checkpointing"),
])
def test_deepspeed_config_that_cannot_work(config, message, tmp_path, run_main):
    proc = run_main(["--ds_config", write_ds_config(tmp_path / "ds.json", **config),
                     "--output_dir", tmp_path / "out"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, message)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_cannot_be_written(tiny_llama_dir, small_corpus_dir, tmp_path,
                                           run_main):
    args = ["--model", tiny_llama_dir, "--dataset", small_corpus_dir,
            "--ds_config", write_ds_config(tmp_path / "ds.json")]
    (tmp_path / "a_file").write_text("not a directory")
    proc = run_main([*args, "--output_dir", tmp_path / "a_file" / "run"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, "a_file is a file, not a directory")
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = run_main([*args, "--output_dir", disk / "run"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, "cannot be written: Read-only file system")


def test_binary_file_named_txt_names_the_byte(tiny_llama_dir, tmp_path, run_main):
    data = tmp_path / "data"
    data.mkdir()
    text = b"In the beginning.\n\n"
    (data / "train.txt").write_bytes(text + bytes(range(128, 256)) * 8)
    proc = run_main(["--model", tiny_llama_dir, "--dataset", data / "train.txt",
                     "--ds_config", write_ds_config(tmp_path / "ds.json"),
                     "--output_dir", tmp_path / "out"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, f"{data / 'train.txt'} is not UTF-8 text: byte {len(text)} (0x80)")


@pytest.mark.parametrize("dataset", ["my_corpus", "data/my_corpus", "./my_corpus", "a/b/c"])
def test_missing_dataset_path_of_any_shape(dataset, tiny_llama_dir, tmp_path, run_main):
    proc = run_main(["--model", tiny_llama_dir, "--dataset", dataset,
                     "--ds_config", write_ds_config(tmp_path / "ds.json"),
                     "--output_dir", tmp_path / "out"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, f"--dataset {dataset}: dataset")
    assert "does not exist" in proc.stderr or "not a local path" in proc.stderr


def test_block_size_beyond_the_models_positions(tiny_gpt2_dir, tiny_llama_dir, tmp_path, capsys,
                                                run_main):
    proc = run_main(["--model", tiny_gpt2_dir, "--block_size", 256,
                     "--output_dir", tmp_path / "out"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, "--block_size 256 is longer than the 128 positions", "--block_size 128")
    check_block_size(str(tiny_llama_dir), 256)  # rotary positions: a warning
    assert "warning: --block_size 256 is longer than the 128 positions" in capsys.readouterr().err


def test_busy_master_port_is_named(tiny_llama_dir, small_corpus_dir, tmp_path, run_main):
    """Rank 0 of a launch (the launcher's environment) whose master port another process holds."""
    with socket.socket() as other_run:
        other_run.bind(("127.0.0.1", 0))
        other_run.listen()
        port = other_run.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir,
                        "--ds_config", write_ds_config(tmp_path / "ds.json"),
                        "--output_dir", tmp_path / "out"])
    assert proc.returncode == EXIT_USAGE
    assert_refused(proc, f"the master port {port} is in use by another process")


# --- every input that could only fail late, refused before any model loads (issue: nothing
# lost, nothing silent) --------------------------------------------------------------------------

def assert_one_line_refusal(proc, message):
    """Exit 2, one error line on stderr (`error: ...` holding `message`), no traceback."""
    assert_refused(proc, message)
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(("error:", "launch/train.py: error:")) \
        and message in lines[0], lines


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--epochs", "inf", "--epochs must be a finite number, got inf"),
    ("--kd_temperature", "inf", "--kd_temperature must be a finite number, got inf"),
    ("--dist_timeout", "nan", "--dist_timeout must be a finite number, got nan"),
    ("--seed", "-1", "--seed must be in 0..4294967295, got -1"),
    ("--seed", str(2**32), f"--seed must be in 0..4294967295, got {2**32}"),
    ("--init_scale", "0.5", "--init_scale is the initial clip scale of --quant_method pact; the "
                            "default quantizer has none"),
    ("--granularity", "group", "--granularity group needs --group_size"),
])
def test_options_that_used_to_pass_silently_or_fail_late(option, value, message, tmp_path,
                                                         run_main):
    before = tree_digest(tmp_path)
    proc = run_main([option, value, "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, message)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_init_scale_with_pact_is_taken(tmp_path):
    from tsld_ds.run.options import parse_args

    assert parse_args(["--quant_method", "pact", "--init_scale", "0.5"]) \
        .quant_config.init_scale == 0.5
    assert parse_args(["--quant_method", "pact"]).quant_config.init_scale == 0.7


@pytest.mark.parametrize("config,message", [
    ({"scheduler": {"type": "WarmupLR", "params": {}}},
     "a \"scheduler\" block is not used; tsld-ds runs its own schedule"),
    ({"gradient_clipping": float("nan")},
     "gradient_clipping must be a finite number >= 0 (0: off), got nan"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be a finite number >= 0"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 5"),
    ({"zero_optimization": {"stage": "three"}},
     "zero_optimization.stage must be 0, 1, 2 or 3, got 'three'"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}},
     "fp16 and bf16 are both enabled; enable one"),
    ({"fp16": {"enabled": True}}, "enables fp16, which DeepSpeed's CPU accelerator cannot train "
                                  "in"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 5e-3}}},
     "sets optimizer.params.lr 0.005 but --lr is 0.0001"),
])
def test_deepspeed_config_keys_are_used_or_refused(config, message, tiny_llama_dir,
                                                   small_corpus_dir, tmp_path, run_main):
    """A key training would ignore or misread (the optimizer's lr, a scheduler, NaN clipping)
    or fail on after the models load (a stage DeepSpeed lacks, two half precisions)."""
    ds = write_ds_config(tmp_path / "ds.json", **config)
    before = tree_digest(tmp_path)
    proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir, "--ds_config", ds,
                     "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, message)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_the_estimator_refuses_what_training_refuses(tmp_path):
    from tsld_ds.errors import UsageError
    from tsld_ds.run.ds_config import read_ds_config

    for config in ({"zero_optimization": {"stage": 5}},
                   {"fp16": {"enabled": True}, "bf16": {"enabled": True}}):
        with pytest.raises(UsageError):  # the one check both read their configs through
            read_ds_config(str(write_ds_config(tmp_path / "ds.json", **config)), world=1)


def test_model_whose_config_does_not_match_its_weights(tiny_llama_dir, small_corpus_dir,
                                                       tmp_path, run_main):
    import json
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_llama_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    ds = write_ds_config(tmp_path / "ds.json")
    before = tree_digest(tmp_path)
    proc = run_main(["--model", tiny_llama_dir, "--teacher", teacher, "--dataset",
                     small_corpus_dir, "--ds_config", ds, "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, f"--teacher '{teacher}': its weights do not match its "
                                  "config.json (model.layers.0.mlp.down_proj.weight is [32, 64] "
                                  "in the weight files, [32, 96] by the config)")
    assert tree_digest(tmp_path) == before


def test_group_size_wider_than_the_layers(tiny_llama_dir, small_corpus_dir, tmp_path, run_main):
    proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir, "--granularity",
                     "group", "--group_size", "48", "--ds_config",
                     write_ds_config(tmp_path / "ds.json"), "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, "--group_size 48 is wider than the narrowest quantized layer "
                                  f"of '{tiny_llama_dir}' (32 input columns)")
    assert not (tmp_path / "out").exists()


def test_tokenizer_that_is_not_the_models(tiny_llama_dir, small_corpus_dir, tmp_path, run_main):
    """Refused after the process group starts, before any model loads: nothing is left behind."""
    from helpers import save_opt_style_tokenizer

    other = save_opt_style_tokenizer(tmp_path / "other-tokenizer", small_corpus_dir)
    ds = write_ds_config(tmp_path / "ds.json")
    before = tree_digest(tmp_path)
    proc = run_main(["--model", tiny_llama_dir, "--tokenizer", other, "--kd", "gt",
                     "--dataset", small_corpus_dir, "--ds_config", ds,
                     "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, f"--tokenizer {other} is not the tokenizer of "
                                  f"'{tiny_llama_dir}'")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_warmup_beyond_the_run(tiny_llama_dir, small_corpus_dir, tmp_path, run_main):
    proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir, "--kd", "gt",
                     "--max_steps", "10", "--warmup_steps", "10", "--block_size", "32",
                     "--ds_config", write_ds_config(tmp_path / "ds.json"),
                     "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, "--warmup_steps 10 is not shorter than the run's 10 steps")
    assert not (tmp_path / "out").exists()


def test_the_run_holds_its_directory_before_any_model_loads(tiny_llama_dir, small_corpus_dir,
                                                            tmp_path, run_main, monkeypatch):
    """args.json (the directory holds a run) and the lock are in place when the first model
    starts loading, and the lock is gone once the run ends, however it ends."""
    from tsld_ds.errors import UsageError
    from tsld_ds.train import build

    out = tmp_path / "out"
    seen = {}

    def load_causal_lm(*args, **kwargs):
        seen.update(files=sorted(p.name for p in out.iterdir()))
        raise UsageError("stopped where the teacher would load")

    monkeypatch.setattr(build, "load_causal_lm", load_causal_lm)
    proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir, "--kd", "gt",
                     "--ds_config", write_ds_config(tmp_path / "ds.json"), "--output_dir", out])
    assert_one_line_refusal(proc, "stopped where the teacher would load")
    assert seen["files"] == ["args.json", "run.lock"]
    assert sorted(p.name for p in out.iterdir()) == ["args.json"]


def test_a_second_run_in_a_locked_directory_is_refused(tiny_llama_dir, small_corpus_dir,
                                                       tmp_path, run_main):
    """Another process holds OUTPUT_DIR/run.lock (a run started a moment ago): refused in one
    line naming it, and nothing in the directory changes."""
    import sys

    from tsld_ds.run.lock import LOCK_FILE

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tsld_ds.run.lock import RunLock; "
         f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "args.json").write_text("{}")
        before = tree_digest(out)
        proc = run_main(["--model", tiny_llama_dir, "--dataset", small_corpus_dir,
                         "--ds_config", write_ds_config(tmp_path / "ds.json"),
                         "--output_dir", out])
        assert_one_line_refusal(proc, f"--output_dir {out} is in use by another run (process "
                                      f"{holder.pid} on {socket.gethostname()}, started ")
        assert tree_digest(out) == before and (out / LOCK_FILE).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_run_no_better_than_uniform_and_worse_than_before_fails(in_process, capsys):
    import re

    import torch.distributed as dist

    from tsld_ds.errors import RunFailed
    from tsld_ds.run.distributed import init_distributed
    from tsld_ds.train.loop import _check_learned

    _check_learned(4095.9, 30.0, 4096, "ckpt")
    for ppl in (4096.0, 1e9, float("nan"), float("inf")):
        with pytest.raises(RunFailed, match=re.escape(
                f"is {ppl:.4g}, no better than a uniform guess over its 4096 tokens, and worse "
                "than before training (30): it diverged")):
            _check_learned(ppl, 30.0, 4096, "ckpt")
    init_distributed(60)  # a random initialisation that improved: only warned of
    _check_learned(4124.0, 4300.0, 4096, "ckpt")
    assert "warning: the student's validation perplexity after training is 4124, no better " \
        "than a uniform guess over its 4096 tokens (it started at 4300: train longer)" in \
        capsys.readouterr().err
    assert dist.is_initialized()


def test_resume_from_a_dangling_latest_offers_the_newest_checkpoint(tiny_llama_dir, tmp_path,
                                                                     run_main):
    out = tmp_path / "out"
    (out / "checkpoints" / "step_0000002").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_0000004\n")  # removed by hand
    before = tree_digest(out)
    proc = run_main(["--model", tiny_llama_dir, "--output_dir", out, "--resume", "latest"])
    assert_one_line_refusal(proc, "--resume latest: `latest` names step_0000004, which is "
                                  "missing; the newest checkpoint there is "
                                  f"{out / 'checkpoints' / 'step_0000002'}: pass --resume "
                                  f"{out / 'checkpoints' / 'step_0000002'}")
    assert tree_digest(out) == before


def test_a_csv_dataset_is_refused_before_any_process_group_starts(tiny_llama_dir, tmp_path,
                                                                  run_main):
    import torch.distributed as dist

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("text\nIn the beginning.\n")
    proc = run_main(["--model", tiny_llama_dir, "--dataset", data, "--output_dir",
                     tmp_path / "out"])
    assert_one_line_refusal(proc, f"--dataset {data}: ")
    assert ".csv" in proc.stderr and not dist.is_initialized()
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, small_corpus_dir, run_main):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, architectures=["BertForMaskedLM"]).save_pretrained(bert)
    proc = run_main(["--model", bert, "--kd", "gt", "--dataset", small_corpus_dir,
                     "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, "BertForMaskedLM, not a causal LM")
    assert not (tmp_path / "out").exists()


def test_a_teacher_cache_of_another_vocabulary_is_refused_before_any_model_loads(
        tiny_llama_dir, small_corpus_dir, tmp_path, run_main):
    import json

    from tsld_ds.teacher.cache import MANIFEST

    cache = tmp_path / "cache"
    cache.mkdir()
    identity = dict(teacher="t", teacher_sha256="a", tokenizer_sha256="k", dataset="d",
                    rows_sha256="r", rows=1, block_size=32)
    (cache / MANIFEST).write_text(json.dumps(dict(
        identity=identity, topk=0, tail_samples=0, vocab_size=99, dtype="float32",
        teacher_numel=1, rows_per_shard=1, shards=[], complete=True)))
    before = tree_digest(tmp_path)
    proc = run_main(["--model", tiny_llama_dir, "--teacher_cache", cache, "--dataset",
                     small_corpus_dir, "--output_dir", tmp_path / "out"])
    assert_one_line_refusal(proc, f"--teacher_cache {cache} holds a teacher of 99 tokens but "
                                  f"student '{tiny_llama_dir}' predicts")
    assert tree_digest(tmp_path) == before
