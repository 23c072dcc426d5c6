"""Faults injected at exact points of real 2-rank runs (the hooks of
tests/drivers/train_with_faults.py): nothing saved before the fault is lost, and the run tells
what happened in one line."""
from helpers import FAULTS_SCRIPT, gt_args, read_metrics, run_train, step_losses, write_ds_config
from tsld_ds.train.checkpoint import latest_checkpoint


def test_kill_while_saving_keeps_the_previous_checkpoint(tiny_llama_dir, small_corpus_dir,
                                                         tmp_path):
    out = tmp_path / "run"
    args = gt_args(tiny_llama_dir, small_corpus_dir, out,
                   write_ds_config(tmp_path / "ds.json", exact_resume=True),
                   **{"max_steps": 6, "save_every": 2})
    proc = run_train(args, env={"TSLD_INJECT_FAULT": "kill_in_save:4"}, check=False,
                     script=FAULTS_SCRIPT)
    assert proc.returncode != 0
    checkpoints = out / "checkpoints"
    assert latest_checkpoint(out) == checkpoints / "step_0000002"
    assert not (checkpoints / "step_0000004").exists()  # only its .tmp debris, never committed
    assert ("error: rank 0 lost contact with the other ranks" in proc.stderr and
            f"Last good checkpoint: {checkpoints / 'step_0000002'}" in proc.stderr), proc.stderr
    before = step_losses(out)
    assert sorted(before) == [1, 2, 3, 4]

    run_train(args + ["--resume", "latest"])
    logged = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # each step once: the resume dropped the lost steps' lines
    resumed = step_losses(out)
    # The steps lost with the unfinished checkpoint come out the same again, bit for bit.
    assert {step: resumed[step] for step in (3, 4)} == {step: before[step] for step in (3, 4)}
    assert latest_checkpoint(out) == checkpoints / "step_0000006"
    assert not (checkpoints / "step_0000004.tmp").exists()


def test_nonfinite_loss_skips_the_batch_then_stops_with_a_checkpoint(tiny_llama_dir,
                                                                     small_corpus_dir, tmp_path):
    out = tmp_path / "run"
    # Rank 1's gt term goes NaN in its micro-batches 3, 5 and 6: the first is skipped on both
    # ranks, the next two in a row reach --max_nonfinite_batches 2.
    proc = run_train(gt_args(tiny_llama_dir, small_corpus_dir, out,
                             write_ds_config(tmp_path / "ds.json"),
                             **{"max_steps": 8, "max_nonfinite_batches": 2}),
                     env={"TSLD_INJECT_FAULT": "nan:gt:3,5,6"}, check=False, script=FAULTS_SCRIPT)
    assert proc.returncode == 1
    assert "warning: step 3: non-finite loss, rank 1: gt=nan, loss=nan; batch skipped" in proc.stderr
    checkpoint = out / "checkpoints" / "step_0000003"
    assert (f"error: non-finite loss in 2 batch(es) in a row, the last at step 4: rank 1: gt=nan, "
            f"loss=nan (--max_nonfinite_batches 2). Last good checkpoint: {checkpoint}; "
            "continue with --resume latest.") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(out) == checkpoint
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())  # no NaN logged
