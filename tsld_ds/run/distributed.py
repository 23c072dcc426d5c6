"""Starting a command's processes: the process group (its rank, world, master port, threads
and timeout), a free port, the seeds, and a value computed by rank 0 for every rank. DeepSpeed is
imported where a process group starts, not before: `free_port` serves the launchers' drivers."""
import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from tsld_ds.devices import set_local_device, set_threads_per_rank
from tsld_ds.errors import UsageError


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The world size the launcher set (DeepSpeed's and torchrun's WORLD_SIZE, Open MPI's, PMI's);
    1 for a plain `python launch/train.py`."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def init_distributed(timeout_s: float) -> None:
    """Under the DeepSpeed launcher the env is set; a plain `python launch/train.py` is 1 rank.
    A collective that waits longer than `timeout_s` (a rank died) fails instead of hanging. A
    process group the caller made (several runs in one process) is used as it is."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        port = free_port()
        # LOCAL_SIZE as DeepSpeed's launcher sets it: without it, its CPU accelerator counts
        # devices by running `numactl` in a subprocess, dozens of times a step.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    elif os.environ["RANK"] == "0" and "TORCHELASTIC_RUN_ID" not in os.environ:
        # (under torchrun the agent itself serves the rendezvous on MASTER_PORT)
        _check_master_port_free(int(os.environ["MASTER_PORT"]))
    import deepspeed

    set_local_device(int(os.environ.get("LOCAL_RANK", 0)))
    threads = set_threads_per_rank()
    skip_shm_all_reduce()
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if dist.get_rank() == 0:
        print(threads, flush=True)


def skip_shm_all_reduce() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce when its process group
    starts (two C++ files, about a minute on first use) and maps a 66 MB buffer per rank in
    /dev/shm that it never unlinks. It serves only `inference_all_reduce` (tensor-parallel
    inference), which tsld-ds never calls: marked incompatible, it is neither built nor mapped.
    Other accelerators have no such op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _check_master_port_free(port: int) -> None:
    """Rank 0 serves the rendezvous on MASTER_PORT: another process listening there (another
    run) would otherwise look like a lost rank."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds
        try:
            s.bind(("", port))
        except OSError:
            raise UsageError(f"the master port {port} is in use by another process (another "
                             "run?); pick a free one with the launcher's --master_port") from None


def seed_everything(seed: int) -> None:
    """The one place a run seeds Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def on_rank_zero(compute):
    """compute() run by rank 0 and its result handed to every rank; a UsageError or OSError
    there is raised on every rank as a UsageError (none waits for a rank that failed)."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box = [compute(), None]
        except (UsageError, OSError) as e:
            box = [None, str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise UsageError(box[1])
    return box[0]
