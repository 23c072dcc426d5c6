"""Faults injected at exact points of real 2-rank runs (the hooks of
tests/drivers/train_with_faults.py): nothing saved before the fault is lost, and the run tells
what happened in one line. The runs are conftest.py's `killed_run`, continued_runs' `after_kill`
and sweep_runs' `nonfinite`, `nan_weights`, `setup_stopped` and `diverged`."""
from helpers import read_metrics, step_losses

from tsld_ds.run.checkpoint import latest_checkpoint


def test_kill_while_saving_keeps_the_previous_checkpoint(killed_run, continued_runs):
    killed, before = killed_run
    checkpoints = killed.path / "checkpoints"
    assert killed.finished.returncode != 0
    assert latest_checkpoint(killed.path) == checkpoints / "step_0000002"
    assert not (checkpoints / "step_0000004").exists()  # only its .tmp debris, never committed
    assert ("error: rank 0 lost contact with the other ranks" in killed.finished.stderr and
            f"Last good checkpoint: {checkpoints / 'step_0000002'}" in killed.finished.stderr), \
        killed.finished.stderr
    assert sorted(before) == [1, 2, 3, 4]

    resumed = continued_runs["after_kill"].path  # a copy, resumed with --resume latest
    logged = [r["step"] for r in read_metrics(resumed) if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # each step once: the resume dropped the lost steps' lines
    losses = step_losses(resumed)
    # The steps lost with the unfinished checkpoint come out the same again, bit for bit.
    assert {step: losses[step] for step in (3, 4)} == {step: before[step] for step in (3, 4)}
    assert latest_checkpoint(resumed) == resumed / "checkpoints" / "step_0000006"
    assert not (resumed / "checkpoints" / "step_0000004.tmp").exists()


def test_nonfinite_loss_skips_the_batch_then_stops_with_a_checkpoint(sweep_runs):
    # Rank 1's gt term goes NaN in its micro-batches 3, 5 and 6: the first is skipped on both
    # ranks, the next two in a row reach --max_nonfinite_batches 2.
    run = sweep_runs["nonfinite"]
    stderr = run.finished.stderr
    assert run.finished.returncode == 1
    assert "warning: step 3: non-finite loss, rank 1: gt=nan, loss=nan; batch skipped" in stderr
    checkpoint = run.path / "checkpoints" / "step_0000003"
    assert (f"error: non-finite loss in 2 batch(es) in a row, the last at step 4: rank 1: gt=nan, "
            f"loss=nan (--max_nonfinite_batches 2). Last good checkpoint: {checkpoint}; "
            "continue with --resume latest.") in stderr
    assert "Traceback" not in stderr
    assert latest_checkpoint(run.path) == checkpoint
    losses = step_losses(run.path)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())  # no NaN logged


def test_nonfinite_weights_are_never_called_good(sweep_runs):
    """Step 3's update made the weights NaN while its loss was finite: its checkpoint is not
    written, the run stops on the NaN losses that follow, and names step 2, the newest good one."""
    run = sweep_runs["nan_weights"]
    stderr = run.finished.stderr
    checkpoints = run.path / "checkpoints"
    assert run.finished.returncode == 1 and "Traceback" not in stderr
    assert ("warning: the weights after step 3 are not finite (" in stderr
            and "so no checkpoint of them was written; `latest` still names step_0000002"
            in stderr), stderr[-3000:]
    assert f"Last good checkpoint: {checkpoints / 'step_0000002'}; continue with --resume " \
        "latest." in stderr
    assert latest_checkpoint(run.path) == checkpoints / "step_0000002"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000001", "step_0000002"]


def test_a_stop_signal_during_set_up_ends_the_run_before_the_models_load(sweep_runs):
    run = sweep_runs["setup_stopped"]
    assert run.finished.returncode == 75
    assert "stopped on SIGTERM during set-up, once the data is ready; nothing was trained or " \
        "saved; start the run again" in run.finished.stderr
    assert "teacher weights" not in run.finished.stdout  # the teacher was never placed
    assert sorted(p.name for p in run.path.iterdir()) == ["args.json"]  # the lock released


def test_a_diverged_run_is_not_called_a_success(sweep_runs):
    run = sweep_runs["diverged"]
    assert run.finished.returncode == 1 and "Traceback" not in run.finished.stderr
    assert "error: " in run.finished.stderr
    assert not (run.path / "summary.json").exists() and not (run.path / "hf").exists()
