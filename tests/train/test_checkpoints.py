"""Checkpoints on real 2-rank runs: each records its defining options and a manifest; damaged or
foreign ones are refused with the newest intact one named; old ones are pruned; a full disk or a
Ctrl-C loses nothing; a resume logs each step once and follows its own schedule. The runs are
conftest.py's shared `tsld` (checkpoints at steps 12, 18 and 20 kept) and those continuing it;
refusals run launch/train.py's main() in this process."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from helpers import (
    REPO,
    gt_args,
    read_metrics,
    run_train,
    small_filesystem,
    step_losses,
    train_command,
    tree_digest,
    write_ds_config,
)

from tsld_ds.convert.cli import main as convert_main
from tsld_ds.errors import EXIT_ABORTED, EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE
from tsld_ds.run.checkpoint import MANIFEST_FILE, OPTIONS_FILE, format_bytes, latest_checkpoint
from tsld_ds.train.cli import main as train_main


def copy_of(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def moved(args, run, copy):
    return [str(copy) if a == str(run) else a for a in args]


def test_checkpoints_record_options_and_manifest_and_keep_the_newest(tsld_run):
    checkpoints = tsld_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == \
        ["step_0000012", "step_0000018", "step_0000020"]  # step 6's pruned (--keep 3)
    assert latest_checkpoint(tsld_run) == checkpoints / "step_0000020"
    for checkpoint in checkpoints.glob("step_*"):
        options = json.loads((checkpoint / OPTIONS_FILE).read_text())
        assert options["bits"] == 2 and options["quant_method"] == "twn" and \
            options["kd"] == "tsld"
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
        on_disk = {p.name for p in checkpoint.iterdir()} - {MANIFEST_FILE}
        assert set(manifest) == on_disk and OPTIONS_FILE in manifest
        assert any("optim_states" in name for name in manifest)
        assert all(manifest[name]["bytes"] == (checkpoint / name).stat().st_size
                   for name in manifest)


def refused(argv, capsys) -> str:
    """launch/train.py's main(argv) in this process: exit 2 with one error line, returned."""
    assert train_main([str(a) for a in argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("change,message", [
    (["--bits", "4"], "--bits 2 (checkpoint) vs 4; --quant_method twn (checkpoint) vs minmax"),
    (["--kd", "logit_gt"], "--kd tsld (checkpoint) vs logit_gt"),
])
def test_resume_with_other_defining_options_is_refused(change, message, shared_runs, tmp_path,
                                                       capsys, in_process):
    tsld = shared_runs["tsld"]
    run = copy_of(tsld.path, tmp_path)
    before = tree_digest(run)
    line = refused([*moved(tsld.argv, str(tsld.path), run), "--max_steps", 24, "--resume",
                    "latest", *change], capsys)
    assert "the checkpoint was written with other options: " + message in line
    assert tree_digest(run) == before


def test_resume_takes_the_same_model_from_another_place(continued_runs):
    """Models are compared by content: a copy staged elsewhere (node-local storage) is the same
    model (continued_runs' `elsewhere` resumed `tsld` with one)."""
    assert sorted(step_losses(continued_runs["elsewhere"].path)) == list(range(13, 21))


def test_overwrite_refuses_to_delete_an_input_of_the_new_run(shared_runs, tiny_teacher_dir,
                                                             tmp_path, capsys, in_process):
    tsld = shared_runs["tsld"]
    run = copy_of(tsld.path, tmp_path)
    shutil.rmtree(run / "hf")
    shutil.copytree(tiny_teacher_dir, run / "hf")  # say, the FP stage's export, as the teacher
    before = tree_digest(run)
    line = refused([*moved(tsld.argv, str(tsld.path), run), "--kd", "logit", "--teacher",
                    run / "hf", "--overwrite_output_dir"], capsys)
    assert f"--teacher {run / 'hf'} lies in what --overwrite_output_dir would delete" in line
    assert tree_digest(run) == before


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_damaged_checkpoint_is_named_with_the_newest_intact_one(damage, shared_runs, tmp_path,
                                                                capsys, in_process):
    tsld = shared_runs["tsld"]
    run = copy_of(tsld.path, tmp_path)
    victim = run / "checkpoints" / "step_0000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "random bytes":
        with open(victim, "r+b") as f:
            f.seek(2000)
            f.write(os.urandom(4096))
        what = "contents changed since it was written (SHA-256 differs)"
    else:
        os.truncate(victim, victim.stat().st_size // 2)
        what = "truncated or overwritten"
    before = tree_digest(run)
    line = refused([*moved(tsld.argv, str(tsld.path), run), "--max_steps", 24, "--resume",
                    "latest"], capsys)
    expected = f"checkpoint {run}/checkpoints/step_0000020 is damaged: {victim.name}: "
    assert expected in line and what in line, line
    assert f"the newest intact checkpoint is {run}/checkpoints/step_0000018" in line
    assert tree_digest(run) == before
    assert convert_main(["--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == \
        EXIT_USAGE
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_resume_with_more_steps_follows_the_new_schedule_and_logs_each_step_once(
        continued_runs):
    """continued_runs' `longer`: `tsld` (20 steps) resumed from its last step to 24."""
    run = continued_runs["longer"].path
    records = read_metrics(run)
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lrs) == list(range(1, 25))  # each step once
    # The summary keeps the perplexity measured before the first run's first step.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student_ppl_before"] == records[0]["eval_ppl"] and records[0]["step"] == 0
    assert lrs[21] == pytest.approx(3e-3 * (1 - 20 / 24))  # the linear decay of a 24-step run
    assert lrs[20] == pytest.approx(3e-3 * (1 - 19 / 20))  # the first run's own


def test_overwrite_output_dir_starts_afresh(continued_runs):
    """continued_runs' `afresh`: a copy of `tsld` started over for 1 step."""
    run = continued_runs["afresh"].path
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001"]
    assert sorted(step_losses(run)) == [1]
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 1]  # before, step 1, after


def adam_checkpoint_size(model_dir) -> str:
    """fp32 master weights and Adam's two moments: 12 bytes a parameter of the model."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        numel = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return format_bytes(12 * numel)


@pytest.mark.e2e
def test_full_disk_keeps_the_last_good_checkpoint(tiny_llama_dir, small_corpus_dir, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json")
    with small_filesystem(tmp_path / "disk", "8m") as disk:
        out = disk / "run"
        args = gt_args(tiny_llama_dir, small_corpus_dir, out, ds, max_steps=6, save_every=1)
        proc = run_train(args, check=False)
        assert proc.returncode == EXIT_FAILED, proc.stderr[-3000:]
        latest = latest_checkpoint(out)
        assert latest is not None and (latest / MANIFEST_FILE).is_file()
        failed = int(latest.name.split("_")[1]) + 1
        assert f"checkpoint step_{failed:07d} could not be written to {out}/checkpoints: no " \
               "space left or over quota" in proc.stderr, proc.stderr[-3000:]
        assert f"`latest` still names {latest.name}" in proc.stderr
        assert f"a checkpoint needs about {adam_checkpoint_size(tiny_llama_dir)}" in proc.stderr
        assert not list((out / "checkpoints").glob("*.tmp"))  # no debris
    with small_filesystem(tmp_path / "small", "2m") as small:
        proc = run_train(gt_args(tiny_llama_dir, small_corpus_dir, small / "run", ds), ranks=0,
                         check=False)
        assert proc.returncode == EXIT_USAGE
        assert f"--output_dir {small}/run has" in proc.stderr
        assert "one checkpoint of this run needs about " \
               f"{adam_checkpoint_size(tiny_llama_dir)}" in proc.stderr


def start(args, ranks, tmp_path):
    cmd, env = train_command(args, ranks=ranks)
    log = open(tmp_path / "log.txt", "w+")
    # Its own process group: a Ctrl-C in a terminal reaches every process of the foreground one.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").is_file() or len(step_losses(out)) < step:
        assert proc.poll() is None and time.time() < deadline, "no step logged in time"
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.parametrize("ranks", [0, 2])
def test_ctrl_c_finishes_the_step_and_saves(ranks, tiny_llama_dir, small_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = gt_args(tiny_llama_dir, small_corpus_dir, out, write_ds_config(tmp_path / "ds.json"),
                   max_steps=1000)
    proc, log = start(args, ranks, tmp_path)
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=120)
    log.seek(0)
    text = log.read()
    stopped = int(latest_checkpoint(out).name.split("_")[1])
    assert f"stopped on SIGINT after step {stopped} of 1000" in text, text[-3000:]
    # No traceback through our code (DeepSpeed's own runner may print its KeyboardInterrupt).
    assert not re.search(r'File ".*(tsld_ds/|launch/train\.py)', text), text[-3000:]
    assert sorted(step_losses(out)) == list(range(1, stopped + 1))
    if ranks == 0:  # DeepSpeed's launcher, itself interrupted, ends in its own way
        assert code == EXIT_STOPPED


@pytest.mark.e2e
def test_second_ctrl_c_aborts_at_once(tiny_llama_dir, small_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = gt_args(tiny_llama_dir, small_corpus_dir, out, write_ds_config(tmp_path / "ds.json"),
                   max_steps=1000)
    proc, log = start(args, 0, tmp_path)
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.time() + 60
    while "Ctrl-C: stopping after this step" not in (tmp_path / "log.txt").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == EXIT_ABORTED
    log.seek(0)
    assert "second Ctrl-C: aborting without a checkpoint" in log.read()
