"""Bad input gets one clear message and a non-zero exit before anything is written."""

from helpers import run_train, save_tiny_model, tiny_llama_config, write_ds_config



def assert_refused(proc, *fragments):
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_missing_model_path(tmp_path):
    proc = run_train(["--model", tmp_path / "nope", "--output_dir", tmp_path / "out"],
                     ranks=0, check=False)
    assert_refused(proc, "does not exist")
    assert not (tmp_path / "out").exists()


def test_unparsable_deepspeed_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 2,,}')
    proc = run_train(["--ds_config", bad, "--output_dir", tmp_path / "out"], ranks=0, check=False)
    assert_refused(proc, "is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_three_bits_is_refused(tmp_path):
    proc = run_train(["--bits", "3", "--output_dir", tmp_path / "out"], ranks=0, check=False)
    assert proc.returncode == 2 and "invalid choice: 3" in proc.stderr


def test_dataset_shorter_than_one_block(tiny_llama_dir, tmp_path):
    data = tmp_path / "tiny"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.txt").write_text("In the beginning.\n")
    proc = run_train(["--model", tiny_llama_dir, "--dataset", data,
                      "--ds_config", write_ds_config(tmp_path / "ds.json"),
                      "--output_dir", tmp_path / "out"], ranks=0, check=False)
    assert_refused(proc, "fewer than one block")
    assert not (tmp_path / "out").exists()


def test_teacher_with_another_vocabulary(tiny_llama_dir, builtin_tokenizer, small_corpus_dir,
                                         tmp_path):
    other = save_tiny_model(tmp_path / "other",
                            tiny_llama_config(len(builtin_tokenizer) + 8), builtin_tokenizer)
    proc = run_train(["--model", tiny_llama_dir, "--teacher", other, "--dataset", small_corpus_dir,
                      "--ds_config", write_ds_config(tmp_path / "ds.json"),
                      "--output_dir", tmp_path / "out"], ranks=0, check=False)
    assert_refused(proc, "vocabularies differ")
    assert not (tmp_path / "out").exists()


def test_existing_run_is_not_overwritten(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step_0000005").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_0000005\n")
    proc = run_train(["--model", tiny_llama_dir, "--output_dir", out], ranks=0, check=False)
    assert_refused(proc, "already holds a run")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000005"]


def test_help_lists_every_option_with_default():
    proc = run_train(["--help"], ranks=0)
    for option in ("--model", "--teacher", "--dataset", "--dataset_config", "--block_size",
                   "--bits", "--quant_method", "--granularity", "--group_size", "--kd",
                   "--kd_temperature", "--lr", "--epochs", "--max_steps", "--eval_every",
                   "--save_every", "--output_dir", "--resume", "--seed", "--ds_config"):
        assert option in proc.stdout
    assert "default:" in proc.stdout


def test_gpu_options_without_the_gpu_extra_name_it(tiny_llama_dir, small_corpus_dir, tmp_path):
    for option in (["--attn_implementation", "flash_attention_2"], ["--optimizer", "adamw_8bit"]):
        proc = run_train(["--model", tiny_llama_dir, "--dataset", small_corpus_dir, *option,
                          "--ds_config", write_ds_config(tmp_path / "ds.json"),
                          "--output_dir", tmp_path / "out"], ranks=0, check=False)
        assert_refused(proc, option[0])
        assert "CUDA GPU" in proc.stderr or ".[gpu]" in proc.stderr


def test_token_scale_needs_tsld(tmp_path):
    proc = run_train(["--kd", "logit", "--token_scale", "uniform", "--output_dir", tmp_path / "out"],
                     ranks=0, check=False)
    assert proc.returncode == 2 and "--token_scale weighs the TSLD term" in proc.stderr
