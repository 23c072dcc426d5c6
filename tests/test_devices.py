"""Device placement: the rules of tsld_ds/devices.py, checked so breaking them fails on the CPU.

On the CPU bench every device is the CPU, so a batch left on the host or a tensor made without a
device works by accident, and fails only on a GPU (a device mismatch in the first forward; NCCL
refusing a CPU tensor). PyTorch's fake CUDA tensors do not get far enough to show it on the CPU
build (torch 2.13 CPU: under FakeTensorMode `torch.empty(..., device="cuda")` works, but slicing
such a tensor, or a transformers model's forward, raises or aborts with "PyTorch is not linked
with support for cuda devices"). So each rule is checked by a mechanism that needs no GPU:

- creation: every tensor factory call in `tsld_ds/` names its device, read from the source (a
  tensor made without one is on the CPU whatever the engine's device is);
- placement: a real 1-rank QAT run plus a stand-alone evaluation, in which every batch tensor
  that reaches a decoder body or a loss must have come out of `to_device`
  (tests/drivers/placement_probe.py records it); taking the placement call out of the training
  step or the evaluation loop fails this test.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, train_args, write_ds_config

from tsld_ds.devices import pins_memory, to_device

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace",
             "logspace", "eye", "rand", "randn", "randint", "randperm", "empty_strided",
             "scalar_tensor"}


def tensors_made_without_a_device(root: Path) -> list[str]:
    """'file:line torch.NAME' for each `torch.NAME(...)` factory call without a device= keyword."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                found.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}")
    return found


def test_every_tensor_made_in_the_package_names_its_device():
    assert tensors_made_without_a_device(REPO / "tsld_ds") == []


def test_the_creation_check_sees_a_missing_device(tmp_path):
    (tmp_path / "mod.py").write_text("import torch\n"
                                     "a = torch.zeros(2, device='cpu')\n"
                                     "b = torch.tensor([1.0], dtype=torch.float64)\n"
                                     "c = torch.zeros_like(a)\n")
    found = tensors_made_without_a_device(tmp_path)
    assert len(found) == 1 and found[0].endswith("mod.py:3 torch.tensor")


def test_to_device_moves_every_tensor_of_a_batch():
    batch = {"input_ids": torch.arange(6, device="cpu").view(2, 3),
             "labels": torch.full((2, 3), -100, device="cpu")}
    moved = to_device(batch, torch.device("meta"))
    assert set(moved) == set(batch)
    assert all(t.device.type == "meta" and t.shape == batch[k].shape for k, t in moved.items())
    assert pins_memory("cuda:1") and not pins_memory("cpu")


@pytest.mark.e2e
def test_batches_reach_models_and_losses_through_to_device(tiny_teacher_dir, small_corpus_dir,
                                                           tmp_path):
    report = tmp_path / "report.json"
    args = train_args(tiny_teacher_dir, small_corpus_dir, tmp_path / "run",
                      write_ds_config(tmp_path / "ds.json"), kd="tsld", max_steps=2, eval_every=1,
                      eval_max_blocks=4, no_export=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    probe = REPO / "tests" / "drivers" / "placement_probe.py"
    proc = subprocess.run([sys.executable, str(probe), str(report), "--", *map(str, args),
                           "--eval_model", str(tiny_teacher_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and report.is_file(), proc.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["train_exit"] == 0, proc.stderr[-4000:]
    assert result["unplaced"] == []
    checked = result["checked"]
    # student and teacher forwards of 2 steps, 3 validation passes each, the stand-alone model
    assert checked.get("decoder body", 0) >= 2 * 2 + 3 + 1, checked
    assert checked.get("objective", 0) == 2, checked
    assert checked.get("cross entropy", 0) >= 3 + 1, checked


def test_threads_per_rank_share_the_cores_unless_omp_num_threads_says(monkeypatch):
    from tsld_ds.devices import set_threads_per_rank
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LOCAL_SIZE", str(cores * 2))   # more ranks than cores: one each
        assert set_threads_per_rank().startswith("1 threads per rank")
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_SIZE", "1")
        set_threads_per_rank()
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert "OMP_NUM_THREADS" in set_threads_per_rank()
        assert torch.get_num_threads() == 1    # the user's setting stands
    finally:
        torch.set_num_threads(before)


def test_ranks_on_a_cpu_node_share_its_memory(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from tsld_ds.devices import local_world_size, memory_per_rank
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert local_world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")   # not a count of this node's ranks
    assert local_world_size() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_world_size() == 4
    total = get_accelerator().total_memory()
    expected = total // 4 if get_accelerator().device_name() == "cpu" else total
    assert memory_per_rank() == expected
