"""Where tensors live. The GPU is the target and the CPU the test bench, so nothing may work only
because every device is the CPU:

- a batch reaches the engines through `to_device`, the one place host tensors move;
- every tensor made for a forward or a collective is made on the engine's device, DeepSpeed's
  accelerator device for this rank (cuda:LOCAL_RANK with NCCL, cpu with gloo): NCCL takes CUDA
  tensors only.
"""
import os

import torch

# How launchers tell a rank how many ranks share its node: DeepSpeed's, torchrun's, SLURM's srun.
_LOCAL_WORLD_SIZE = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")


def set_local_device(local_rank: int) -> None:
    """Binds this process to its accelerator before the process group starts: NCCL's barrier and
    object broadcasts use the current device, which would otherwise be device 0 on every rank."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(local_rank)


def pins_memory(device) -> bool:
    """Whether host batches bound for `device` should be pinned (page-locked) so that their copy
    to it can overlap compute."""
    return torch.device(device).type == "cuda"


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`. Copies from pinned memory do not block the host; CUDA
    orders them before any later kernel on the stream, so the batch is ready when used."""
    return {name: tensor.to(device, non_blocking=tensor.is_pinned())
            for name, tensor in batch.items()}


def local_world_size() -> int:
    """The ranks on this node, as the launcher said; 1 without one."""
    return next((int(os.environ[name]) for name in _LOCAL_WORLD_SIZE
                 if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0), 1)


def memory_per_rank() -> int:
    """Bytes of accelerator memory this rank may plan with: its GPU's, or on the CPU accelerator
    its share of the host's memory, which the node's ranks split."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    total = accelerator.total_memory()
    return total // local_world_size() if accelerator.device_name() == "cpu" else total


def set_threads_per_rank() -> str:
    """Gives this rank's intra-op threads its share of the node's cores (the cores it may run on,
    divided by the ranks on the node), unless OMP_NUM_THREADS says otherwise; returns what was
    chosen, for the log. Each rank would otherwise start a thread per core, and the ranks'
    threads would take turns on the same cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} threads per rank (OMP_NUM_THREADS)"
    cores, ranks = len(os.sched_getaffinity(0)), local_world_size()
    threads = max(1, cores // ranks)
    torch.set_num_threads(threads)
    return f"{threads} threads per rank ({cores} cores, {ranks} rank(s) on this node)"
