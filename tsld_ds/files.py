"""Files that a crash never leaves half-written, checked when read back: the one place tsld-ds
writes a file atomically, hashes one, finds where a path that does not exist yet would go, or
asks whether the process that left a file behind still runs."""
import hashlib
import os
import tempfile
from pathlib import Path

from tsld_ds.errors import UsageError

_BLOCK = 1 << 24  # read 16 MiB at a time: a 10 GB checkpoint file hashes in constant memory


def sha256_file(path, *, sync: bool = False) -> str:
    """The file's SHA-256; with `sync`, its data is also flushed to the disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def write_atomically(path, data: bytes | str) -> None:
    """`path` holds `data` whole or keeps what it held: written to a temporary sibling, synced to
    the disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync_directory(path) -> None:
    """Makes the names in directory `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nearest_existing_parent(path) -> Path:
    """`path` itself if it exists, else its closest ancestor that does: where it would be
    created, which decides whether it can be and how much room there is."""
    path = Path(path).expanduser().absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(path, what: str) -> None:
    """`path` is a directory that can be written, or can be created: a file is made and removed
    in it or in its nearest existing parent, and nothing is left behind."""
    path = Path(path).expanduser().absolute()
    existing = nearest_existing_parent(path)
    if not existing.is_dir():
        raise UsageError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be written: {e.strerror or e} "
                         f"({existing})") from None


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (the owner of a lock or of a temporary file
    it left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
