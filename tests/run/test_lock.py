"""tsld_ds.run.lock: one run at a time in an output directory, a dead run's lock taken over.
(A run refused by a live lock, end to end in-process: tests/train/test_train_errors.py.)"""
import json
import os
import subprocess
import sys
import time

import pytest

from tsld_ds.errors import UsageError
from tsld_ds.run import lock as run_lock
from tsld_ds.run.lock import LOCK_FILE, STALE_AFTER_S, Owner, RunLock


def write_lock(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    owner = dict(host="node-7", pid=4242, started="2026-12-06 10:00:00 UTC", slurm_job=None)
    (directory / LOCK_FILE).write_text(json.dumps({**owner, **fields}))
    return directory / LOCK_FILE


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_acquire_writes_the_owner_and_release_removes_what_it_made(tmp_path):
    out = tmp_path / "new" / "run"
    lock = RunLock(out)
    lock.acquire()
    assert Owner(**json.loads((out / LOCK_FILE).read_text())) == lock.owner
    lock.release()
    assert not out.exists()  # made by acquire, left empty: gone again; its parent stays
    assert (tmp_path / "new").is_dir()


def test_release_keeps_the_directory_once_the_run_wrote_there(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    (tmp_path / "run" / "args.json").write_text("{}")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["args.json"]


def test_a_live_run_of_this_host_is_not_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = write_lock(tmp_path, host=Owner.this_process().host, pid=holder.pid)
        before = path.read_text()
        with pytest.raises(UsageError, match=f"is in use by another run \\(process {holder.pid} "
                                             f"on {Owner.this_process().host}, started "):
            RunLock(tmp_path).acquire()
        assert path.read_text() == before
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_run_of_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    write_lock(tmp_path, host=Owner.this_process().host, pid=int(dead))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_counts_while_its_owner_touches_it(tmp_path):
    path = write_lock(tmp_path)  # node-7: its process cannot be asked from here
    with pytest.raises(UsageError, match="process 4242 on node-7, started 2026-12-06 10:00:00"):
        RunLock(tmp_path).acquire()
    age(path, STALE_AFTER_S + 5)  # its owner stopped touching it: the node died
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads(path.read_text())["host"] == lock.owner.host
    lock.release()


def test_a_requeued_slurm_job_takes_its_earlier_starts_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, slurm_job="31337")  # the earlier start, on another node
    monkeypatch.setenv("SLURM_JOB_ID", "31337")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "31338")  # another job: refused
    write_lock(tmp_path, slurm_job="31337")
    with pytest.raises(UsageError, match="SLURM job 31337"):
        RunLock(tmp_path).acquire()


def test_an_unreadable_lock_counts_until_it_is_old(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text("")  # its owner between creating and writing it
    with pytest.raises(UsageError, match="its owner is writing the lock"):
        RunLock(tmp_path).acquire()
    age(path, STALE_AFTER_S + 5)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_the_owner_keeps_touching_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    age(tmp_path / LOCK_FILE, STALE_AFTER_S + 5)
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
