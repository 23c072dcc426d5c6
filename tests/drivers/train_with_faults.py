"""launch/train.py with hooks that inject a fault at an exact point of the run, so that fault
handling is tested deterministically with real processes (tests/train/test_faults.py). The
fault comes from TSLD_INJECT_FAULT; it hits the last rank only:

    nan:TERM:N[,N...]   the loss term TERM (and so "loss") becomes NaN in this rank's
                        micro-batches N, counted from 1
    kill_in_save:STEP   the rank SIGKILLs itself while checkpoint STEP is being written: after its
                        files are on disk, before the checkpoint is committed

    deepspeed tests/drivers/train_with_faults.py [launch/train.py options]
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from tsld_ds.train.cli import run  # noqa: E402
from tsld_ds.train.hooks import TrainHooks  # noqa: E402


class FaultHooks(TrainHooks):
    def __init__(self, fault: str):
        self.kind, *self.fields = fault.split(":")
        self.batches_seen = 0

    def _here(self, kind: str) -> bool:
        return self.kind == kind and dist.get_rank() == dist.get_world_size() - 1

    def loss_terms(self, terms: dict) -> dict:
        self.batches_seen += 1
        if not self._here("nan") or str(self.batches_seen) not in self.fields[1].split(","):
            return terms
        term, nan = self.fields[0], float("nan")
        return {**terms, term: terms[term] + nan, "loss": terms["loss"] + nan}

    def checkpoint_files_written(self, step: int) -> None:
        if self._here("kill_in_save") and int(self.fields[0]) == step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run(FaultHooks(os.environ["TSLD_INJECT_FAULT"]))
