"""Bad input gets one clear message and exit code 2 before any model loads and before anything
is written. launch/train.py's main() runs in this process (`in_process`); one test runs the script
as a user does."""
import os
import socket
import subprocess
from types import SimpleNamespace

import pytest
from helpers import run_train, save_tiny_model, small_filesystem, tiny_llama_config, write_ds_config

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
