"""tsld_ds.run.checkpoint's check that weights are finite before they are called good (the runs
that save, resume and damage checkpoints: tests/train/test_checkpoints.py, test_faults.py)."""
import pytest
import torch

from tsld_ds.run.checkpoint import nonfinite_parameters
from tsld_ds.run.distributed import init_distributed


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_parameters_names_each_bad_weight(bad, in_process):
    init_distributed(60)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 7))
    assert nonfinite_parameters(model, "cpu") == []
    with torch.no_grad():
        model[1].weight[2, 1] = bad
    assert nonfinite_parameters(model, "cpu") == ["1.weight"]


def test_a_zero3_shard_is_checked_not_the_empty_placeholder(in_process):
    """Under ZeRO-3 a parameter's data is an empty placeholder; its values are in `ds_tensor`,
    this rank's shard."""
    init_distributed(60)
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_tensor = torch.tensor([1.0, float("nan")])
    module = torch.nn.Module()
    module.weight = weight
    assert nonfinite_parameters(module, "cpu") == ["weight"]
