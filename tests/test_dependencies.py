"""What tsld-ds relies on in its dependencies beyond their documented API (docs/dependencies.md):
each is checked here, so that an upgrade that changes it fails this file by name instead of a run
somewhere later. (The rest are checked where they are used: see the table.)"""
import inspect
import sys

import pytest
import torch


def test_ds_to_universal_takes_the_options_we_give_its_main():
    """run/universal.py calls ds_to_universal.main with a hand-built Namespace: its parser must
    define exactly the options we set."""
    from deepspeed.checkpoint import ds_to_universal

    from tsld_ds.run import universal

    source = inspect.getsource(universal.convert_to_universal)
    given = {name for name in ("input_folder", "output_folder", "num_extract_workers",
                               "num_merge_workers", "keep_temp_folder", "strict",
                               "inject_missing_state") if f"{name}=" in source}
    argv = sys.argv
    try:
        sys.argv = ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"]
        defined = set(vars(ds_to_universal.parse_arguments()))
    finally:
        sys.argv = argv
    assert defined == given, (defined - given, given - defined)


def test_deepspeed_names_the_optimizers_it_builds():
    """run/ds_config.py refuses an optimizer type DeepSpeed cannot build from its own list."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    assert {"adam", "adamw"} <= set(DEEPSPEED_OPTIMIZERS)


def test_the_cpu_accelerator_counts_its_devices_from_local_size(monkeypatch):
    """run/distributed.py sets LOCAL_SIZE for a plain 1-process run: without it DeepSpeed's CPU
    accelerator runs `numactl` in a subprocess to count devices, dozens of times a step."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the CPU accelerator's behaviour")
    monkeypatch.setenv("LOCAL_SIZE", "3")
    assert get_accelerator().device_count() == 3


def test_lambda_lr_keeps_its_base_rates_and_epoch_in_attributes():
    """train/loop.py's resume sets `scheduler.base_lrs` to this run's peak rate and reads
    `last_epoch` (the saved step) to follow the new schedule from there."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    optimizer.step()
    scheduler.step()
    assert scheduler.base_lrs == [0.5] and scheduler.last_epoch == 1
    scheduler.base_lrs = [1.0]
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 / 3)


def test_a_view_knows_its_base_tensor():
    """capacity/estimate.py counts the memory saved for backward by storage: a view's `_base`."""
    tensor = torch.zeros(4, 4)
    assert tensor[1]._base is tensor and tensor._base is None
