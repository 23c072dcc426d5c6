"""`launch/train.py` / `tsld-train`: parse options, run, and turn bad input and faults into one
clear line and an exit code of the table in tsld_ds.errors (also in `--help`)."""
import os
import re
import sys
import warnings

import torch.distributed as dist

from tsld_ds.errors import (EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE, RunFailed,
                            UsageError)
from tsld_ds.train.args import parse_args
from tsld_ds.train.checkpoint import latest_checkpoint
from tsld_ds.train.hooks import TrainHooks
from tsld_ds.train.nonfinite import NonFiniteLoss
from tsld_ds.train.signals import StopSignals


def main(argv=None, hooks: TrainHooks | None = None) -> int:
    """One run of `argv`; returns its exit code. It makes and destroys its process group, or,
    where the caller made one (several runs in one process), uses that and leaves it."""
    args = parse_args(argv)
    stop = StopSignals()  # before the slow imports: a notice that comes during set-up counts too
    # torch.distributed deprecation notices raised from inside DeepSpeed, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from tsld_ds.train.loop import train  # heavy imports after --help and option errors

    owns_process_group = not dist.is_initialized()
    try:
        summary = train(args, stop, hooks)
        dist.barrier()  # rank 0 may still be writing the export: nobody tears down before it
    except UsageError as e:
        # Every rank of a node checks the same input and refuses it alike: one line per node.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as e:
        if dist.get_rank() == 0:  # every rank stopped at the same batch with the same message
            print(f"error: {e}. {_last_good_checkpoint(args)}", file=sys.stderr)
        return EXIT_FAILED
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as e:
        if not _is_collective_failure(e):
            raise
        print(f"error: rank {os.environ.get('RANK', 0)} lost contact with the other ranks (one "
              f"died, hung longer than --dist_timeout {args.dist_timeout:g} s, or never started): "
              f"{_first_sentence(e)}. {_last_good_checkpoint(args)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_STOPPED if summary.stopped_by else EXIT_COMPLETED


def run(hooks: TrainHooks | None = None) -> None:
    """Entry point of launch/train.py and `tsld-train`: `main()`, then exit at once.

    Every file is closed and the process group destroyed by then. A normal interpreter exit
    would go on to destroy DeepSpeed's and gloo's C++ objects while their threads may still
    run, which now and then aborts a rank that is done ("terminate called without an active
    exception", exit -6) and turns a finished run into a failed one."""
    code = main(hooks=hooks)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# What gloo's transport says when a peer is gone or silent past the timeout. A blocking
# collective names gloo's source file in its message; the wait on an async one (DeepSpeed's
# ZeRO-3 all-gathers) gives only the text, e.g. "Application timeout caused pair closure".
_GLOO_TRANSPORT_ERRORS = ("gloo", "pair closure", "Connection closed by peer",
                          "Connection reset by peer")


def _is_collective_failure(error: RuntimeError) -> bool:
    # NCCL and the rendezvous store raise DistError; gloo a RuntimeError from its transport.
    return isinstance(error, dist.DistError) or any(
        text in str(error) for text in _GLOO_TRANSPORT_ERRORS)


def _first_sentence(error: Exception) -> str:
    """'Read error [127.0.0.1]:14479: Connection reset by peer' from gloo's
    '[.../gloo/transport/tcp/pair.cc:537] Read error [...]: Connection reset by peer. This is...'"""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    return re.split(r"\.\s|\n", text, maxsplit=1)[0]


def _last_good_checkpoint(args) -> str:
    path = latest_checkpoint(args.output_dir)
    if path is None:
        return "No checkpoint was saved yet."
    return f"Last good checkpoint: {path}; continue with --resume latest."
