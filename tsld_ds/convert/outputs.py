"""Where a conversion writes, and what it may replace: its --output is checked before the
checkpoint is read, and written beside itself, to take the old output's place only once complete."""
import contextlib
import os
import shutil
from pathlib import Path

from tsld_ds.errors import UsageError
from tsld_ds.files import nearest_existing_parent


def output_path(output: str, fmt: str) -> Path:
    """The path to write: --output, or model.gguf in it for a gguf directory. Refused at once,
    before the checkpoint is looked for, where it cannot be created (a file on its way)."""
    path = Path(output).expanduser()
    if fmt == "gguf" and path.suffix != ".gguf":
        path = path / "model.gguf"
    existing = nearest_existing_parent(path.parent)
    if not existing.is_dir():
        raise UsageError(f"--output '{path}' cannot be written: '{existing}' is a file, not a "
                         "directory")
    return path


def check_target(path: Path, fmt: str, overwrite: bool, run_dir: Path) -> None:
    """`path` is not the run being read nor anything inside it or around it, and not an existing
    output unless `overwrite`."""
    target, run = path.resolve(), run_dir.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise UsageError(f"--output '{path}' is, holds or lies inside the run being converted "
                         f"({run_dir}); write it beside the run, e.g. --output {run_dir}-{fmt}")
    if path.exists() and (path.is_file() or any(path.iterdir())):
        if not overwrite:
            raise UsageError(f"--output '{path}' already exists; pass --overwrite to replace it")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"--output '{path}' is a directory that is not a model (no "
                             "config.json): --overwrite replaces only an earlier output")


@contextlib.contextmanager
def written_beside(path: Path):
    """Yields a temporary sibling of `path` to write; when the block completes, the sibling
    takes `path`'s place (an existing `path` is removed only then). If the block fails, the
    sibling is removed and `path` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*-*"):  # left by a conversion killed midway
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            if ".old-" in stale.name and not path.exists():  # killed between the two renames
                os.replace(stale, path)
            else:
                _remove(stale)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    _remove(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
