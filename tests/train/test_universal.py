"""Resuming a 2-rank ZeRO-3 run at world size 1 through DeepSpeed's universal checkpoint."""
from pathlib import Path

import pytest
from helpers import step_losses

from tsld_ds.run.universal import saved_world_size, translate_sampler, universal_path


def test_resume_on_one_rank_continues_the_two_rank_losses(tsld_run, one_rank_runs):
    """one_rank_runs' `universal`: (a copy of) `tsld` resumed from its step 18 at world size 1,
    with the same global batch (2 ranks x micro 2 before, 1 rank x micro 2 x accumulation 2)."""
    run = one_rank_runs["universal"]
    step18 = Path(run.argv[run.argv.index("--resume") + 1])
    assert saved_world_size(step18) == 2
    assert (universal_path(step18) / "zero").is_dir()
    expected, got = step_losses(tsld_run), step_losses(run.path)
    assert sorted(got) == [19, 20]
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
