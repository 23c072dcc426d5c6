"""launch/train.py with hooks that inject a fault at an exact point of the run, so that fault
handling is tested deterministically with real processes (tests/train/test_faults.py). The
fault comes from TSLD_INJECT_FAULT; it hits the last rank only:

    nan:TERM:N[,N...]   the loss term TERM (and so "loss") becomes NaN in this rank's
                        micro-batches N, counted from 1
    kill_in_save:STEP   the rank SIGKILLs itself while checkpoint STEP is being written: after its
                        files are on disk, before the checkpoint is committed
    nan_weights:N       NaN written into the optimizer's (master) copy of this rank's part of the
                        student's weights during its micro-batch N (after the forward): the
                        step's update makes them NaN, its loss was finite
    term_in_setup       the rank sends itself SIGTERM once the run's data is loaded, before the
                        models load

    deepspeed tests/drivers/train_with_faults.py [launch/train.py options]
"""
import contextlib
import os
import signal
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tsld_ds.train import build  # noqa: E402
from tsld_ds.train.cli import run  # noqa: E402
from tsld_ds.train.hooks import TrainHooks  # noqa: E402


class FaultHooks(TrainHooks):
    def __init__(self, fault: str):
        self.kind, *self.fields = fault.split(":")
        self.batches_seen = 0
        self.run = None

    @contextlib.contextmanager
    def installed(self):
        """The faults that strike during set-up, where no hook reaches, patched in for one run."""
        if self.kind != "term_in_setup":
            yield
            return
        load_rows = build.load_rows

        def then_term(*args, **kwargs):
            rows = load_rows(*args, **kwargs)
            if self._here("term_in_setup"):
                os.kill(os.getpid(), signal.SIGTERM)
            return rows

        with mock.patch.object(build, "load_rows", then_term):
            yield

    def run_built(self, run) -> None:
        self.run = run

    def _here(self, kind: str) -> bool:
        return self.kind == kind and dist.get_rank() == dist.get_world_size() - 1

    def loss_terms(self, terms: dict) -> dict:
        self.batches_seen += 1
        if self._here("nan_weights") and self.batches_seen == int(self.fields[0]):
            # ZeRO-3's optimizer updates this rank's fp32 partitions (a DeepSpeed internal) and
            # copies them into the model after the step.
            master = self.run.engine.optimizer.fp32_partitioned_groups_flat[0]
            with torch.no_grad():
                master.fill_(float("nan"))
        if not self._here("nan") or str(self.batches_seen) not in self.fields[1].split(","):
            return terms
        term, nan = self.fields[0], float("nan")
        return {**terms, term: terms[term] + nan, "loss": terms["loss"] + nan}

    def checkpoint_files_written(self, step: int) -> None:
        if self._here("kill_in_save") and int(self.fields[0]) == step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    hooks = FaultHooks(os.environ["TSLD_INJECT_FAULT"])
    with hooks.installed():
        run(hooks)
