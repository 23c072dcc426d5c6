"""launch/slurm/train.sbatch under a real SLURM: tests/slurm/run.sh starts a one-node cluster on
this machine (munge, slurmctld and slurmd from Debian, installed when missing), submits the tiny
teacher on 2 CPU ranks with `sbatch --wait`, checks the job and its output, and stops the cluster.

By default run.sh's case `usr1` (about 2 minutes on two idle cores): a job that SLURM's time-limit
signal stops mid-run (checkpoint), train.sbatch requeues, and the restart resumes with --resume
latest and completes, with the losses of conftest.py's sweep_runs `gt`, an uninterrupted run of
the same options on one node. TSLD_SLURM_CASES picks others (`plain`: a run to completion;
`preempt`: preemption by a higher-priority partition, requeue by SLURM; `timelimit`: SLURM's own
--signal=USR1@120 notice, then scancel). Needs root and Debian's packages or apt-get; skipped,
with the reason, where it cannot run."""
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, free_port, write_ds_config

RUN_SH = REPO / "tests" / "slurm" / "run.sh"
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
CASES = os.environ.get("TSLD_SLURM_CASES", "usr1").split()


def installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True,
                          text=True)
    return proc.returncode == 0 and proc.stdout == "install ok installed"


def why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM test: Linux only"
    if os.geteuid() != 0:
        return "SLURM test: needs root (munged, slurmctld and slurmd run as root)"
    if shutil.which("dpkg-query") is None:
        return "SLURM test: not a Debian system (no dpkg-query)"
    if not all(map(installed, PACKAGES)) and shutil.which("apt-get") is None:
        return f"SLURM test: {' '.join(PACKAGES)} not installed and no apt-get"
    return None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory, sweep_runs, tiny_teacher_dir, small_corpus_dir):
    """run.sh's environment: the session's tiny teacher and corpus with sweep_runs' `gt` options
    (run.sh's own, and `gt` the reference to compare losses with), one work directory for all
    cases, a private SLURM state directory."""
    reference = sweep_runs["gt"]
    root = tmp_path_factory.mktemp("slurm")
    fixtures = root / "fixtures"
    fixtures.mkdir()
    (fixtures / "tiny-llama").symlink_to(tiny_teacher_dir)
    (fixtures / "corpus").symlink_to(small_corpus_dir)
    write_ds_config(fixtures / "ds.json", exact_resume=True)
    steps = reference.argv[reference.argv.index("--max_steps") + 1]
    return {**os.environ, "PYTHON": sys.executable, "TSLD_SLURM_FIXTURES": str(fixtures),
            "TSLD_SLURM_WORK": str(root / "work"), "TSLD_SLURM_DIR": str(root / "cluster"),
            "TSLD_SLURM_PORT": str(free_port()), "TSLD_SLURM_STEPS": steps,
            "TSLD_SLURM_REFERENCE": str(reference.path)}


@pytest.mark.e2e
@pytest.mark.skipif(why_not() is not None, reason=why_not() or "")
@pytest.mark.parametrize("case", CASES)
def test_train_sbatch_under_slurm(case, slurm_env):
    proc = subprocess.run(["bash", str(RUN_SH), case], env=slurm_env, capture_output=True,
                          text=True, timeout=1200)
    print(proc.stdout[-3000:])
    if proc.returncode == 3:  # setup.sh: apt-get could not install the packages
        pytest.skip(f"SLURM test: installing {' '.join(PACKAGES)} failed:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, (f"tests/slurm/run.sh {case} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-8000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-4000:]}")
