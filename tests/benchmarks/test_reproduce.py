"""benchmarks/reproduce.py: the run grid, and each preset end to end on a tiny model: the short
one's two runs, and the long one's task split, FP stage, teacher cache and two QAT runs."""
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


def stop_during_the_first_run(args, root):
    """SIGTERM to the script while its first run trains: it exits 128 + 15, and the launcher and
    ranks it started are gone with it."""
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


def test_two_runs_end_to_end_stop_and_resume(tiny_teacher_dir, small_corpus_dir, tmp_path):
    root, docs = tmp_path / "runs", tmp_path / "docs"
    args = ["--model", tiny_teacher_dir, "--dataset", small_corpus_dir, "--block_size", 32,
            "--ds_config", write_ds_config(tmp_path / "ds.json"), "--steps", 2,
            "--eval_every", 1, "--eval_max_blocks", 4, "--confidence_blocks", 8,
            "--only", "w2-gt", "w2-tsld", "--output_root", root, "--docs_dir", docs]
    stop_during_the_first_run(args, root)
    calls = docs / "runs" / "short" / "invocations.jsonl"
    assert [json.loads(line)["note"] for line in calls.read_text().splitlines()] == \
        ["stopped by SIGTERM"]
    assert not (docs / "runs" / "short" / "w2-gt").exists()  # no record of an unfinished run

    out = reproduce(*args)  # resumes from a checkpoint, or starts again if none was saved yet
    assert "[1/2] w2-gt seed 42: val PPL" in out and "[2/2] w2-tsld seed 42: val PPL" in out
    assert len(calls.read_text().splitlines()) == 2
    page = (docs / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ")]
    assert rows == ["run", "teacher", "ptq-w2", "w2-gt", "w2-tsld"]
    assert "python " + str(SCRIPT) in page and "Machine" in page
    for png in ("val_ppl_main-w2.png", "token_scale.png"):
        assert (docs / "img" / png).read_bytes().startswith(b"\x89PNG")

    record = docs / "runs" / "short" / "w2-tsld" / "seed-42"
    assert {p.name for p in record.iterdir()} == {"reproduce.json", "summary.json",
                                                  "metrics.jsonl"}
    assert json.loads((record / "reproduce.json").read_text())["teacher_sha256"] is None

    # Hand-written findings survive a rerun, which trains nothing: both runs are recorded with
    # the docs, so the run directories (scratch, not kept) are not needed to rebuild the page.
    (docs / "results.md").write_text(page.replace("_No findings written yet", "Kept. _x"))
    shutil.rmtree(root)
    out = reproduce(*args)
    assert out.count("skipped (recorded in") == 2 and "0 trained" in out
    rebuilt = (docs / "results.md").read_text()
    assert "Kept. _x" in rebuilt and rebuilt.replace("Kept. _x", "_No findings written yet") \
        .split("- **Date**")[0] == page.split("- **Date**")[0]

    # A record of the same run with other options is not replaced by a new run.
    meddled = json.loads((record / "reproduce.json").read_text())
    meddled["train_options"][meddled["train_options"].index("--lr") + 1] = "0.5"
    (record / "reproduce.json").write_text(json.dumps(meddled))
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "records a run with other options" in proc.stderr
    assert not root.exists()  # refused before anything trained


def long_preset(root, docs, tiny_teacher_dir, small_corpus_dir, ds, *extra):
    return ["--preset", "long", "--model", tiny_teacher_dir, "--dataset", small_corpus_dir,
            "--block_size", 32, "--ds_config", ds, "--train_tokens", 3000,
            "--teacher_epochs", 1, "--epochs", 2, "--seeds", 42, "--eval_max_blocks", 4,
            "--eval_train_blocks", 4, "--confidence_blocks", 8,
            "--only", "w2-tsld", "w2-tsld_nogt", "--num_gpus", 1, "--output_root", root,
            "--docs_dir", docs, *extra]


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


def test_long_preset_end_to_end_keeps_the_short_section_and_resumes(
        tiny_teacher_dir, small_corpus_dir, tmp_path):
    root, docs = tmp_path / "runs", tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(  # an earlier page: the short regime's section, findings
        "<!-- regime short -->\nShort section. _y\n<!-- /regime short -->\n"
        "<!-- findings -->\nKept. _x\n<!-- /findings -->\n")
    args = long_preset(root, docs, tiny_teacher_dir, small_corpus_dir,
                       write_ds_config(tmp_path / "ds.json"))
    out = reproduce(*args)
    assert "FP stage: teacher: training" in out and "teacher cache" in out
    assert "[2/2] w2-tsld_nogt seed 42: val PPL" in out
    task = json.loads((root / "task" / "task.json").read_text())
    assert 3000 <= task["train_tokens"] < 3000 + 5000 and task["validation_blocks"] >= 4
    nogt = [json.loads(line) for line in
            (root / "w2-tsld_nogt" / "seed-42" / "metrics.jsonl").read_text().splitlines()]
    terms = {k for r in nogt for k in r}
    assert "tsld" in terms and "gt" not in terms  # the TSLD term alone
    assert sum("train_ppl" in r for r in nogt) >= 3  # before, every epoch, after
    page = (docs / "results.md").read_text()
    assert "Short section. _y" in page and "Kept. _x" in page
    assert page.index("regime long") < page.index("regime short")
    rows = [line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ")]
    assert rows == ["run", "teacher (given)", "teacher", "ptq-w2", "w2-tsld", "w2-tsld_nogt"]
    assert "training tokens in sequences of 32" in page
    assert "validation tokens in sequences of 32" in page
    for png in ("long_curves.png", "long_token_scale_train.png",
                "long_token_scale_validation.png"):
        assert (docs / "img" / png).read_bytes().startswith(b"\x89PNG")

    records = docs / "runs" / "long"
    teacher = json.loads((records / "w2-tsld" / "seed-42" / "reproduce.json").read_text())
    assert len(teacher["teacher_sha256"]) == 64  # the records name the fine-tuned teacher

    # A run stopped after its last checkpoint resumes from it; the stages are not redone.
    (root / "w2-tsld_nogt" / "seed-42" / "summary.json").unlink()
    shutil.rmtree(records / "w2-tsld_nogt")
    out = reproduce(*args)
    assert "FP stage" not in out and "teacher cache" not in out
    assert "w2-tsld seed 42: skipped (recorded in" in out
    assert "w2-tsld_nogt seed 42: resuming" in out and "1 trained" in out
