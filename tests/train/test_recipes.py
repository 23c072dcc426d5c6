"""The LLaMA-7B-class recipes in ds_configs/ run, at 2 gloo ranks on the tiny model: each file as
shipped, with only what names the hardware changed (conftest.py's sweep_runs `recipe/NAME`)."""
import pytest
from helpers import read_metrics


def losses(run) -> list:
    return [r["loss"] for r in read_metrics(run.path) if "loss" in r]


@pytest.mark.parametrize("name", ["8x80gb", "8x40gb-offload", "hpz-teacher"])
def test_recipe_trains_on_two_ranks(name, sweep_runs):
    got = losses(sweep_runs[f"recipe/{name}"])
    assert len(got) == 2 and all(loss == loss for loss in got)


def test_zero2_trains_as_zero3_does(sweep_runs):
    """ds_configs/zero2.json (parameters whole on each rank) takes the same steps as zero3.json
    (sharded), to float32 round-off: the stage changes where the states live, not the math."""
    zero2, zero3 = losses(sweep_runs["recipe/zero2"]), losses(sweep_runs["recipe/zero3"])
    assert len(zero2) == 3
    assert zero2 == pytest.approx(zero3, rel=1e-5)
