"""How a command ends: errors a user can fix (one clear line, no traceback) and the exit codes of
`launch/train.py`, which `--help`, docs/operations.md and launch/slurm/ follow."""
import textwrap


class UsageError(Exception):
    """Bad input: a wrong path, a config that cannot work, mismatched teacher and student."""


class RunFailed(Exception):
    """The run cannot go on (a checkpoint that cannot be written); its message says what was
    kept."""


EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75    # sysexits' EX_TEMPFAIL: stopped on purpose, resume to go on
EXIT_ABORTED = 130   # the shell's code for a death by SIGINT

EXIT_CODES = {
    EXIT_COMPLETED: "the run completed (OUTPUT_DIR/summary.json written)",
    EXIT_FAILED: "it failed: a rank was lost, too many NaN/inf losses in a row, weights that are "
                 "not finite at its end, a checkpoint that could not be written, or a student that "
                 "diverged (no better than a uniform guess, and worse than before); the message "
                 "names the last good checkpoint",
    EXIT_USAGE: "bad options or input, found before training started",
    EXIT_STOPPED: "stopped by SIGUSR1, SIGTERM or Ctrl-C after saving a checkpoint: continue "
                  "with --resume latest (during set-up: stopped before training, nothing saved; "
                  "start it again)",
    EXIT_ABORTED: "aborted by a second Ctrl-C, without a checkpoint of the current step",
}


def exit_code_table(width: int = 79) -> str:
    return "\n".join(textwrap.fill(meaning, width, initial_indent=f"  {code:<5}",
                                    subsequent_indent=" " * 7)
                      for code, meaning in EXIT_CODES.items())
