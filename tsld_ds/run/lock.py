"""One run at a time in an output directory: rank 0 takes OUTPUT_DIR/run.lock before the run
writes or loads anything there, and removes it when the run ends. A second run (a double submit,
a requeue that overlaps the job it replaces) is refused in one line naming the owner.

The lock is a file created exclusively (atomic on local and network filesystems), holding its
owner: host, process, start time and SLURM job. The owner touches it every HEARTBEAT_S seconds.
A lock is stale, and taken over, when its owner is gone: a process of this host that no longer
exists, the same SLURM job (requeued: its previous start is over), or a lock untouched for
STALE_AFTER_S seconds (a process of another host that died; the margin covers clock skew).
"""
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from tsld_ds.errors import UsageError
from tsld_ds.files import process_alive, write_atomically
from tsld_ds.run.distributed import on_rank_zero

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str            # local time, for the message
    slurm_job: str | None   # SLURM_JOB_ID: a requeued job keeps it

    @classmethod
    def this_process(cls) -> "Owner":
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   slurm_job=os.environ.get("SLURM_JOB_ID"))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"process {self.pid} on {self.host}{job}, started {self.started}"


class RunLock:
    """OUTPUT_DIR/run.lock held by this process from `acquire()` to `release()`."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE
        self.owner = Owner.this_process()
        self._beating = threading.Event()
        self._heart: threading.Thread | None = None
        self._made_dir = False

    def acquire(self) -> None:
        """Takes the lock (creating OUTPUT_DIR if need be), or raises UsageError naming the run
        that holds it."""
        self._made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps(asdict(self.owner))
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            if not self._stale(holder):
                who = holder.describe() if holder else "its owner is writing the lock"
                raise UsageError(f"--output_dir {self.path.parent} is in use by another run "
                                 f"({who}); wait for it to end, or write this run "
                                 "elsewhere") from None
            write_atomically(self.path, record)  # a stale lock: taken over
            time.sleep(0.2)  # another process taking it over at once: the last write wins
            holder = self._holder()
            if holder != self.owner:
                raise UsageError(f"--output_dir {self.path.parent} was just taken by another "
                                 f"run ({holder.describe() if holder else 'unknown'})") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
        self._beating.clear()
        self._heart = threading.Thread(target=self._beat, daemon=True, name="run.lock")
        self._heart.start()

    def release(self) -> None:
        """Removes the lock if it is still this process's, and OUTPUT_DIR if `acquire` made it
        and the run left nothing there (a run refused before it wrote anything)."""
        self._beating.set()
        if self._heart is not None:
            self._heart.join()
            self._heart = None
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)
        if self._made_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty: the run's outputs
                pass

    def _beat(self) -> None:
        while not self._beating.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed under us (a hand-cleaned directory): nothing to keep up
                return

    def _holder(self) -> Owner | None:
        """Who the lock file names (None: unreadable, e.g. its owner is writing it)."""
        for _ in range(3):
            try:
                return Owner(**json.loads(self.path.read_text()))
            except FileNotFoundError:
                return None
            except (ValueError, TypeError):
                time.sleep(0.1)
        return None

    def _stale(self, holder: Owner | None) -> bool:
        if holder is None:  # unreadable: only its age tells
            return self._untouched()
        if holder.host == self.owner.host and not process_alive(holder.pid):
            return True
        if holder.slurm_job is not None and holder.slurm_job == self.owner.slurm_job:
            return True  # this job's earlier start, before SLURM requeued it
        return self._untouched()

    def _untouched(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True


@contextmanager
def output_dir_lock(output_dir) -> Iterator[None]:
    """Collective: rank 0 holds OUTPUT_DIR's RunLock for the block (every rank raises its
    refusal)."""
    lock = RunLock(output_dir) if dist.get_rank() == 0 else None
    on_rank_zero(lambda: lock.acquire())
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
