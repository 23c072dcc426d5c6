"""Where a conversion writes, and what it may replace: its --output is checked before the
checkpoint is read, and written beside itself, to take the old output's place only once complete.

A conversion marks what it writes, so that --overwrite replaces an earlier conversion's output
and never anything else: a directory (hf, packed) gets a manifest of the files written into it,
and --overwrite removes those files only; a GGUF file carries a metadata key of its own.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath

from tsld_ds.errors import UsageError
from tsld_ds.files import nearest_existing_parent, process_alive, write_atomically

# In an output directory: the files the conversion wrote there. Written last, so a directory
# without it holds no complete conversion.
MANIFEST = "tsld_convert.json"
# In a GGUF file: the step of the checkpoint converted. The file's own metadata rather than a
# file beside it, because the file is the whole output (copied and moved as one) and llama.cpp
# ignores keys it does not know. A tool that copies metadata (llama-quantize) passes it on.
GGUF_MARK = "tsld_ds.converted_from_step"
# Files not written by a conversion named in a refusal, at most.
_NAMED = 5


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
    """`path` is not the run being read nor anything inside it or around it, and is new (or an
    empty directory), or else an earlier conversion's output with nothing else in it, replaced
    only with `overwrite`."""
    target, run = path.resolve(), run_dir.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise UsageError(f"--output '{path}' is, holds or lies inside the run being converted "
                         f"({run_dir}); write it beside the run, e.g. --output {run_dir}-{fmt}")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not written_by_convert(path):
        raise UsageError(f"--output '{path}' already exists and was not written by convert; "
                         "--overwrite replaces only an earlier conversion's output: choose "
                         "another --output")
    others = _unlisted(path) if path.is_dir() else []
    if others:
        named = ", ".join(others[:_NAMED]) + (f" and {len(others) - _NAMED} more"
                                              if len(others) > _NAMED else "")
        raise UsageError(f"--output '{path}' holds an earlier conversion's output and also "
                         f"{named}, which convert did not write; --overwrite replaces only what "
                         "convert wrote: move those out or choose another --output")
    if not overwrite:
        raise UsageError(f"--output '{path}' already exists; pass --overwrite to replace it")


def record_output(directory: Path, fmt: str, step: int) -> None:
    """Marks `directory`, once written, as a conversion's output: its manifest lists every file
    in it."""
    files = sorted(f.relative_to(directory).as_posix() for f in directory.rglob("*")
                   if not f.is_dir())
    write_atomically(directory / MANIFEST, json.dumps(
        {"written_by": "tsld-ds convert", "format": fmt, "step": step, "files": files},
        indent=2) + "\n")


def written_by_convert(path: Path) -> bool:
    """Whether `path` is a conversion's output: a directory with a readable manifest, or a GGUF
    file with the mark."""
    if path.is_dir():
        return _listed(path) is not None
    if not path.is_file():
        return False
    import gguf  # not at the CLI's --help

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        return GGUF_MARK in gguf.GGUFReader(path).fields
    except (OSError, ValueError, IndexError):  # unreadable or truncated
        return False


def _listed(directory: Path) -> list[str] | None:
    """The files `directory`'s manifest lists (paths inside it); None without a valid one."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    inside = isinstance(files, list) and all(
        isinstance(name, str) and name and not PurePosixPath(name).is_absolute()
        and ".." not in PurePosixPath(name).parts for name in files)
    return files if inside else None


def _unlisted(directory: Path) -> list[str]:
    """What `directory` holds besides its manifest and the files it lists: files, and folders
    that hold no listed file (named once, as 'sub/')."""
    listed = {*(_listed(directory) or []), MANIFEST}
    holding = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents}
    others = []
    for entry in sorted(directory.rglob("*")):
        name = entry.relative_to(directory).as_posix()
        if any(name.startswith(other) for other in others if other.endswith("/")):
            continue  # inside a folder already named
        if entry.is_dir() and not entry.is_symlink():
            if name not in holding:
                others.append(name + "/")
        elif name not in listed:
            others.append(name)
    return others


@contextlib.contextmanager
def written_beside(path: Path):
    """Yields a temporary sibling of `path` to write; when the block completes, the sibling
    takes `path`'s place (an existing `path` is removed only then). If the block fails, the
    sibling and the folders made for it are removed, and `path` is as it was."""
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*-*"):  # left by a conversion killed midway
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            if ".old-" not in stale.name:
                _remove(stale)
            elif not path.exists():  # killed between the two renames
                os.replace(stale, path)
            else:
                _remove_output(stale)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        for folder in made:  # deepest first; one something else was put in stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    _remove_output(old)


def _remove(path: Path) -> None:
    """Removes what this module wrote (a temporary sibling)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_output(path: Path) -> None:
    """Removes a replaced output: a file, or the files its manifest lists and the manifest, then
    the folders that leaves empty. Anything else (put there since it was checked) stays."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    listed = _listed(path) or []
    for name in (*listed, MANIFEST):
        (path / name).unlink(missing_ok=True)
    folders = {path, *(path / parent for name in listed for parent in PurePosixPath(name).parents)}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds what it did not list
            folder.rmdir()
