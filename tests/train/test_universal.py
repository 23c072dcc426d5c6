"""Resuming a 2-rank ZeRO-3 run at world size 1 through DeepSpeed's universal checkpoint."""
import pytest

from helpers import run_train, step_losses, train_args, write_ds_config

from tsld_ds.train.universal import saved_world_size, translate_sampler, universal_path


def test_resume_on_one_rank_continues_the_two_rank_losses(llama256_run, llama256_dir,
                                                          small_corpus_dir, tmp_path):
    step2 = llama256_run / "checkpoints" / "step_0000002"
    assert saved_world_size(step2) == 2
    # Same global batch: 2 ranks x micro 2 before, 1 rank x micro 2 x accumulation 2 now.
    ds = write_ds_config(tmp_path / "ds.json", gradient_accumulation_steps=2)
    resumed = tmp_path / "resumed"
    run_train(train_args(llama256_dir, small_corpus_dir, resumed, ds, kd="gt", eval_max_blocks=8,
                         max_steps=4, resume=step2, no_export=True), ranks=1)
    assert (universal_path(step2) / "zero").is_dir()
    expected, got = step_losses(llama256_run), step_losses(resumed)
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.parametrize("consumed,saved,world,expected", [
    (6, 2, 1, 12),  # exact: the same 12 samples consumed
    (6, 2, 3, 4),   # exact
    (5, 2, 3, 3),   # 10 samples -> 9: rounded down to a multiple of 3
])
def test_sampler_position_keeps_the_global_sample_count(consumed, saved, world, expected):
    assert translate_sampler({"epoch": 1, "consumed": consumed}, saved, world) == \
        {"epoch": 1, "consumed": expected}
