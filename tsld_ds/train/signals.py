"""Stopping a run without losing it: SIGUSR1 (SLURM's notice before the time limit,
`--signal=USR1@120`), SIGTERM (preemption, scancel, the DeepSpeed launcher's shutdown) and SIGINT
(Ctrl-C) ask a run to stop cleanly.

The handler only records the signal. Every rank hands `received` to the loop's one collective per
micro-batch, so all ranks stop after the same step even when the signal reached only some of them;
the loop then saves a checkpoint and the process exits with EXIT_STOPPED (tsld_ds.errors). Repeats
are ignored: a second signal while the checkpoint is being written must not cut it short. Only a
second Ctrl-C aborts at once.
"""
import os
import signal
import sys

from tsld_ds.errors import EXIT_ABORTED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class SetupStopped(Exception):
    """A stop signal came while the run was being set up: it ends before training, having
    saved nothing (there is nothing to save)."""


class StopSignals:
    def __init__(self):
        self.received = 0  # the first stop signal's number; 0 while none has come
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
            # Python makes a handled signal interrupt system calls; a collective or a checkpoint
            # write blocked in C++ would then fail with EINTR instead of carrying on.
            signal.siginterrupt(sig, False)

    def _record(self, signum, frame) -> None:
        if not self.received:
            self.received = signum
            if signum == signal.SIGINT and os.environ.get("LOCAL_RANK", "0") == "0":
                print("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort "
                      "at once)", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT == self.received:
            print("second Ctrl-C: aborting without a checkpoint of the current step",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_ABORTED)

    @staticmethod
    def name(signum: int) -> str | None:
        """The name of the signal `signum` ('SIGTERM'); None for 0, no signal."""
        return signal.Signals(signum).name if signum else None

    def check_during_setup(self, done: str) -> None:
        """Collective, between the phases of a run's set-up (each may take minutes at 7B): a stop
        signal any rank has received ends the run now (SetupStopped), not after the rest."""
        # Imported here: StopSignals is installed before the command's heavy imports.
        import torch
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        received = torch.tensor([self.received], device=get_accelerator().current_device_name())
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        if received.item():
            raise SetupStopped(f"stopped on {self.name(int(received.item()))} during set-up, "
                               f"once {done}; nothing was trained or saved")
