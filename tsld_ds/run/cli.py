"""The one shell of the five commands (launch/*.py and their tsld-* entry points): a command's
work, with what can go wrong turned into one clear line and an exit code of tsld_ds.errors' table,
and the process group it made destroyed.

A bad input is found alike by every rank and a failure reaches every rank alike, so their message
is printed once per node (by its local rank 0). A lost rank is each survivor's own news: each one
that notices says so.
"""
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist

from tsld_ds.errors import EXIT_FAILED, EXIT_USAGE, RunFailed, UsageError

# What gloo's transport says when a peer is gone or silent past the timeout. A blocking
# collective names gloo's source file in its message; the wait on an async one (DeepSpeed's
# ZeRO-3 all-gathers) gives only the text, e.g. "Application timeout caused pair closure".
_GLOO_TRANSPORT_ERRORS = ("gloo", "pair closure", "Connection closed by peer",
                          "Connection reset by peer")


def run_command(work: Callable[[], int], *, dist_timeout: float | None = None,
                explain: Callable[[Exception], str | None] | None = None) -> int:
    """`work()`'s exit code; a UsageError is EXIT_USAGE, a RunFailed or a lost rank (waited for
    `dist_timeout` s) EXIT_FAILED, each with its one line on stderr, and `explain(error)`
    appended to a failure's (where to go on from). A process group `work` made is destroyed; one
    the caller made (several commands in one process) is left to it. Any other exception is a
    bug, and its traceback shows."""
    owns_process_group = not dist.is_initialized()
    try:
        return work()
    except UsageError as e:
        _once_per_node(f"error: {e}")
        return EXIT_USAGE
    except RunFailed as e:
        _once_per_node(f"error: {e}{_then(explain, e)}")
        return EXIT_FAILED
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        waited = f" {dist_timeout:g} s" if dist_timeout is not None else ""
        print(f"error: rank {os.environ.get('RANK', 0)} lost contact with the other ranks (one "
              f"died, hung longer than --dist_timeout{waited}, or never started): "
              f"{first_sentence(e)}{_then(explain, e)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def entry_point(main: Callable[[], int]) -> NoReturn:
    """A command's process: `main()`, then exit at once with its code.

    Every file is closed and the process group destroyed by then. A normal interpreter exit
    would go on to destroy DeepSpeed's and gloo's C++ objects while their threads may still run,
    which now and then aborts a process that is done ("terminate called without an active
    exception", exit -6) and turns a finished run into a failed one."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_collective_failure(error: RuntimeError) -> bool:
    # NCCL and the rendezvous store raise DistError; gloo a RuntimeError from its transport.
    return isinstance(error, dist.DistError) or any(
        text in str(error) for text in _GLOO_TRANSPORT_ERRORS)


def first_sentence(error: Exception) -> str:
    """'Read error [127.0.0.1]:14479: Connection reset by peer' from gloo's
    '[.../gloo/transport/tcp/pair.cc:537] Read error [...]: Connection reset by peer. This is...'"""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    return re.split(r"\.\s|\n", text, maxsplit=1)[0]


def _then(explain: Callable[[Exception], str | None] | None, error: Exception) -> str:
    more = explain(error) if explain is not None else None
    return f". {more}" if more else ""


def _once_per_node(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr)
