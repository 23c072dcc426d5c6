"""Test hooks that inject a fault at an exact point of a run, so fault handling can be tested
deterministically with real processes. They read one environment variable, TSLD_INJECT_FAULT;
unset (every real run), each hook does nothing.

    nan:TERM:N[,N...]   the last rank's loss term TERM (and so "loss") becomes NaN in its
                        micro-batches N, counted from 1 in this process
    kill_in_save:STEP   the last rank SIGKILLs itself while checkpoint STEP is being written: after
                        its files are on disk, before the checkpoint is committed
"""
import os
import signal

import torch.distributed as dist

ENV = "TSLD_INJECT_FAULT"
_batches_seen = 0


def _fault_here(kind: str) -> list[str] | None:
    """The fault's fields when TSLD_INJECT_FAULT is of `kind` and this is the last rank."""
    kind_and_fields = os.environ.get(ENV, "").split(":")
    if kind_and_fields[0] != kind or dist.get_rank() != dist.get_world_size() - 1:
        return None
    return kind_and_fields[1:]


def poison_losses(losses: dict) -> dict:
    global _batches_seen
    _batches_seen += 1
    fields = _fault_here("nan")
    if fields is None or str(_batches_seen) not in fields[1].split(","):
        return losses
    term = fields[0]
    nan = float("nan")
    return {**losses, term: losses[term] + nan, "loss": losses["loss"] + nan}


def kill_in_save(step: int) -> None:
    fields = _fault_here("kill_in_save")
    if fields is not None and int(fields[0]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
