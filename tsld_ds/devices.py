"""Where tensors live. The GPU is the target and the CPU the test bench, so nothing may work only
because every device is the CPU:

- a batch reaches the engines through `to_device`, the one place host tensors move;
- every tensor made for a forward or a collective is made on the engine's device, DeepSpeed's
  accelerator device for this rank (cuda:LOCAL_RANK with NCCL, cpu with gloo): NCCL takes CUDA
  tensors only.
"""
import torch


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
