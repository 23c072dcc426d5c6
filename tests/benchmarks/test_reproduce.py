"""benchmarks/reproduce.py: the run grid, the presets' plans, the task split, the short section
from recorded runs, and one tiny end-to-end call of the long preset (task split, FP stage,
teacher cache, one QAT run; stopped and resumed)."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, write_ds_config

SCRIPT = REPO / "benchmarks" / "reproduce.py"
sys.path.insert(0, str(SCRIPT.parent))
from reproduce import budget_options, parse_args, same_options  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def reproduce(*args, timeout=900):  # generous: CI machines may be shared
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops the launcher and ranks it started
        proc.communicate(timeout=150)
        raise
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    return stdout


def option_pairs(command):
    """{option: value} of a launch/train.py command line (flags map to True)."""
    words = command[command.index(str(REPO / "launch" / "train.py")) + 1:]
    pairs = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            pairs[word] = True if following.startswith("--") else following
    return pairs


def test_a_preset_gives_its_defaults_and_a_given_budget_replaces_its_own():
    short, long = parse_args([]), parse_args(["--preset", "long"])
    assert (short.steps, short.epochs, short.output_root) == (60, None, "runs/reproduce")
    assert (long.steps, long.epochs, long.seeds) == (None, 30, [42, 43, 44])
    assert long.train_tokens == 50_000 and long.output_root == "runs/reproduce-long"
    assert [r.name for r in long.selected] == ["w2-gt", "w2-logit", "w2-logit_gt", "w2-tsld",
                                               "w2-tsld_nogt"]
    given_steps = parse_args(["--preset", "long", "--steps", "5"])
    assert (given_steps.steps, given_steps.epochs) == (5, None)
    given_epochs = parse_args(["--epochs", "2", "--eval_every", "0"])
    assert (given_epochs.steps, given_epochs.epochs) == (None, 2)
    given_epochs.steps_per_epoch = None
    assert budget_options(given_epochs)[:6] == ["--epochs", "2", "--lr", "0.0001",
                                                "--eval_every", "0"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3", "--epochs", "2"], "give the budget as --steps or as --epochs, not both"),
    (["--epoch", "2"], "unrecognized arguments: --epoch"),  # no abbreviations
    (["--steps", "0"], "the budget must be positive"),
    (["--eval_every", "-1"], "--eval_every must be 0 or more"),
    (["--preset", "long", "--model", "a", "--teacher", "b"], "give --model or --teacher"),
    (["--only", "w9-tsld"], "--only 'w9-tsld' matches no run"),
])
def test_bad_options_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_recorded_options_match_in_any_order_and_only_when_equal():
    options = ["--lr", "0.0001", "--max_steps", "60", "--no_export", "--output_dir", "d"]
    assert same_options(["--max_steps", "60", "--lr", "0.0001", "--output_dir", "d",
                         "--no_export"], options)
    assert not same_options(["--max_steps", "61", "--lr", "0.0001", "--no_export",
                             "--output_dir", "d"], options)
    assert not same_options(options[:-3], options) and not same_options(None, options)
    # A record made in another clone: the same run, with that clone's path off the config.
    here = ["--ds_config", str(REPO / "ds_configs" / "zero2.json"), *options]
    assert same_options(["--ds_config", "ds_configs/zero2.json", *options], here)
    assert not same_options(["--ds_config", "/elsewhere/ds_configs/zero2.json", *options], here)


def test_dry_run_gives_every_run_the_same_budget_and_ablations_one_flag():
    lines = reproduce("--dry_run", "--steps", 7, "--seeds", 1, 2).splitlines()
    commands = {}
    for line in lines:
        options = option_pairs(shlex.split(line))
        commands[options["--output_dir"]] = options
    assert len(commands) == len(lines) == 2 * 20  # 20 runs, 2 seeds, each its own directory
    assert all(o["--max_steps"] == "7" and o["--lr"] == "0.0001" for o in commands.values())
    reference = commands["runs/reproduce/w2-tsld/seed-1"]
    for name in ("uniform", "inverse", "t1", "t5", "t20", "tensor", "pact", "absmean"):
        ablation = commands[f"runs/reproduce/w2-tsld-{name}/seed-1"]
        changed = {k for k in reference.keys() | ablation.keys()
                   if reference.get(k) != ablation.get(k) and k != "--output_dir"}
        assert len(changed) == 1, (name, changed)


def long_preset(root, docs, tiny_teacher_dir, small_corpus_dir, ds, *extra,
                only=("w2-tsld", "w2-tsld_nogt")):
    return ["--preset", "long", "--model", tiny_teacher_dir, "--dataset", small_corpus_dir,
            "--block_size", 32, "--ds_config", ds, "--train_tokens", 3000,
            "--teacher_epochs", 1, "--epochs", 2, "--seeds", 42, "--eval_max_blocks", 4,
            "--eval_train_blocks", 4, "--confidence_blocks", 8,
            "--only", *only, "--num_gpus", 1, "--output_root", root, "--docs_dir", docs, *extra]


def test_long_preset_dry_run_writes_nothing_and_shares_one_cache(tiny_teacher_dir,
                                                                  small_corpus_dir, tmp_path):
    root = tmp_path / "runs"
    args = long_preset(root, tmp_path / "docs", tiny_teacher_dir, small_corpus_dir,
                       write_ds_config(tmp_path / "ds.json"), "--dry_run")
    commands = [shlex.split(line) for line in reproduce(*args).splitlines()]
    assert not root.exists()
    fp, cache, *runs = commands
    assert str(REPO / "launch" / "teacher_cache.py") in cache
    fp = option_pairs(fp)
    assert fp["--bits"] == "16" and fp["--kd"] == "gt" and fp["--model"] == str(tiny_teacher_dir)
    runs = [option_pairs(c) for c in runs]
    assert [r["--kd"] for r in runs] == ["tsld", "tsld_nogt"]
    for r in runs:  # the student is the fine-tuned teacher, trained on the task from its cache
        assert r["--model"] == r["--teacher"] == str(root / "teacher-fp" / "hf")
        assert r["--dataset"] == str(root / "task") == fp["--dataset"]
        assert r["--teacher_cache"] == str(root / "teacher-cache")
        assert r["--epochs"] == "2" and r["--eval_every"] == fp["--eval_every"]


def stop_during_the_first_training(args, root):
    """SIGTERM to the script while its first launch trains: it exits 128 + 15, and the launcher
    and ranks it started are gone with it."""
    import psutil

    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert ": training (" in proc.stdout.readline()
    time.sleep(5)  # the launcher and its ranks are up
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)  # not its 120 s limit: the group did go
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM after 0 run(s)" in stderr
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(root) in " ".join(p.info["cmdline"] or [])]
    assert not left, left


@pytest.mark.e2e
def test_long_preset_end_to_end_stops_resumes_and_keeps_the_short_section(
        tiny_teacher_dir, small_corpus_dir, tmp_path):
    """The long preset on the tiny teacher for one run (w2-tsld): stopped by SIGTERM during the
    FP stage, then the same command again: the task split, the FP stage (resumed or started
    again), the teacher cache and the QAT run, the page with the long section beside the kept
    short one; a third call trains nothing, and a record of other options is refused."""
    root, docs = tmp_path / "runs", tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(  # an earlier page: the short regime's section, findings
        "<!-- regime short -->\nShort section. _y\n<!-- /regime short -->\n"
        "<!-- findings -->\nKept. _x\n<!-- /findings -->\n")
    args = long_preset(root, docs, tiny_teacher_dir, small_corpus_dir,
                       write_ds_config(tmp_path / "ds.json"), only=("w2-tsld",))
    stop_during_the_first_training(args, root)
    calls = docs / "runs" / "long" / "invocations.jsonl"
    assert [json.loads(line)["note"] for line in calls.read_text().splitlines()] == \
        ["stopped by SIGTERM"]

    out = reproduce(*args)
    assert "FP stage: teacher: " in out and "teacher cache" in out
    assert "[1/1] w2-tsld seed 42: val PPL" in out
    task = json.loads((root / "task" / "task.json").read_text())
    assert 3000 <= task["train_tokens"] < 3000 + 5000 and task["validation_blocks"] >= 4
    metrics = [json.loads(line) for line in
               (root / "w2-tsld" / "seed-42" / "metrics.jsonl").read_text().splitlines()]
    assert {"tsld", "gt"} <= {k for r in metrics for k in r}
    assert sum("train_ppl" in r for r in metrics) >= 3  # before, every epoch, after
    page = (docs / "results.md").read_text()
    assert "Short section. _y" in page and "Kept. _x" in page
    assert page.index("regime long") < page.index("regime short")
    rows = [line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ")]
    assert rows == ["run", "teacher (given)", "teacher", "ptq-w2", "w2-tsld"]
    assert "training tokens in sequences of 32" in page
    assert "validation tokens in sequences of 32" in page
    for png in ("long_curves.png", "long_token_scale_train.png",
                "long_token_scale_validation.png"):
        assert (docs / "img" / png).read_bytes().startswith(b"\x89PNG")
    record = docs / "runs" / "long" / "w2-tsld" / "seed-42"
    assert {p.name for p in record.iterdir()} == {"reproduce.json", "summary.json",
                                                  "metrics.jsonl"}
    assert len(json.loads((record / "reproduce.json").read_text())["teacher_sha256"]) == 64
    assert len(calls.read_text().splitlines()) == 2

    # A rerun trains nothing: the run is recorded with the docs, the stages are done.
    out = reproduce(*args)
    assert "FP stage" not in out and "teacher cache" not in out
    assert "w2-tsld seed 42: skipped (recorded in" in out and "0 trained" in out
    assert (docs / "results.md").read_text().split("- **Date**")[0] == page.split("- **Date**")[0]

    # A record of the same run with other options is not replaced by a new run.
    meddled = json.loads((record / "reproduce.json").read_text())
    meddled["train_options"][meddled["train_options"].index("--lr") + 1] = "0.5"
    (record / "reproduce.json").write_text(json.dumps(meddled))
    shutil.rmtree(root / "w2-tsld")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "records a run with other options" in proc.stderr
    assert not (root / "w2-tsld").exists()  # refused before anything trained


def test_the_task_split_holds_out_every_fifth_document(tiny_teacher_dir, small_corpus_dir,
                                                       tmp_path):
    from reproduce_task import VALIDATION_EVERY, write_task_split

    request = dict(dataset=str(small_corpus_dir), dataset_config=None, text_column=None,
                   tokenizer=str(tiny_teacher_dir), train_tokens=3000, block_size=32)
    task = write_task_split(tmp_path / "task", **request)
    assert 3000 <= task["train_tokens"] < 3000 + 5000 and task["validation_blocks"] >= 4
    train = (tmp_path / "task" / "train.jsonl").read_text().splitlines()
    held_out = (tmp_path / "task" / "validation.jsonl").read_text().splitlines()
    assert len(held_out) == (len(train) + len(held_out)) // VALIDATION_EVERY
    assert write_task_split(tmp_path / "task", **request) == task  # written once
    with pytest.raises(SystemExit, match="holds another task"):
        write_task_split(tmp_path / "task", **{**request, "train_tokens": 4000})


def test_the_short_section_tables_and_plots_recorded_runs(sweep_runs, tmp_path):
    """The short preset's section from real runs (sweep_runs' gt and logit as the grid's w2-gt
    and w2-logit): a row per run after the teacher and the PTQ floor, and its curves."""
    from reproduce_grid import GRID
    from reproduce_plots import plot_curves
    from reproduce_report import RunResults, read_seed_result, short_section, teacher_perplexity

    specs = {spec.name: spec for spec in GRID}
    results = [RunResults(specs[name], [read_seed_result(sweep_runs[run].path, 7)])
               for name, run in (("w2-gt", "gt"), ("w2-logit", "logit"))]
    plot_curves(results, teacher_perplexity(results), tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    section = short_section(results=results, setup={"Machine": "m"}, invocations=[],
                            plots={"curves": "img/val_ppl_x.png"}, confidence_lines=[])
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    assert rows == ["run", "teacher", "ptq-w2", "w2-gt", "w2-logit"]
    assert "![curves](img/val_ppl_x.png)" in section
