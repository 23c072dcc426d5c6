"""`launch/train.py` / `tsld-train`: parse the options into a RunConfig and train, through the
commands' shell (tsld_ds.run.cli: one clear line and an exit code of tsld_ds.errors' table, also
in `--help`)."""
import sys
import warnings

import torch.distributed as dist

from tsld_ds.errors import EXIT_COMPLETED, EXIT_STOPPED, RunFailed
from tsld_ds.run.checkpoint import latest_checkpoint
from tsld_ds.run.cli import entry_point, run_command
from tsld_ds.run.config import RunConfig
from tsld_ds.run.options import parse_args
from tsld_ds.train.hooks import TrainHooks
from tsld_ds.train.nonfinite import NonFiniteLoss
from tsld_ds.train.signals import SetupStopped, StopSignals


def main(argv=None, hooks: TrainHooks | None = None) -> int:
    """One run of `argv`; returns its exit code. It makes and destroys its process group, or,
    where the caller made one (several runs in one process), uses that and leaves it."""
    config = parse_args(argv)
    stop = StopSignals()  # before the slow imports: a notice that comes during set-up counts too
    # torch.distributed deprecation notices raised from inside DeepSpeed, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from tsld_ds.train.loop import train  # heavy imports after --help and option errors

    def work() -> int:
        try:
            summary = train(config, stop, hooks)
        except SetupStopped as e:
            if dist.get_rank() == 0:
                print(f"{e}; start the run again", file=sys.stderr, flush=True)
            return EXIT_STOPPED
        dist.barrier()  # rank 0 may still be writing the export: nobody tears down before it
        return EXIT_STOPPED if summary.stopped_by else EXIT_COMPLETED

    def where_to_go_on(error: Exception) -> str | None:
        """A failed checkpoint write names what `latest` still holds itself."""
        if isinstance(error, RunFailed) and not isinstance(error, NonFiniteLoss):
            return None
        return _last_good_checkpoint(config)

    return run_command(work, dist_timeout=config.dist_timeout, explain=where_to_go_on)


def run(hooks: TrainHooks | None = None) -> None:
    """Entry point of launch/train.py and `tsld-train`."""
    entry_point(lambda: main(hooks=hooks))


def _last_good_checkpoint(config: RunConfig) -> str:
    path = latest_checkpoint(config.output_dir)
    if path is None:
        return "No checkpoint was saved yet."
    return f"Last good checkpoint: {path}; continue with --resume latest."
