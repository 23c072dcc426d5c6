"""Two "nodes" on one machine, each started by launch/slurm/node.sh as SLURM's srun would start it
(DeepSpeed's launcher with --no_ssh, node ranks 0 and 1, one CPU rank each, master 127.0.0.1):
a clean stop on SIGUSR1, a resume on two nodes with the same losses as one node with two ranks
(sweep_runs' `gt`, the same options), and a rank on the other node that hangs."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers import REPO, assert_e2e, free_port, step_losses

from tsld_ds.run.checkpoint import latest_checkpoint

NODE_SCRIPT = REPO / "launch" / "slurm" / "node.sh"


def start_two_nodes(args, logs_dir, name: str) -> list[subprocess.Popen]:
    assert_e2e()
    env = {**os.environ, "TSLD_NODES": "node0 node1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "TSLD_PROCS_PER_NODE": "1", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    nodes = []
    for node_rank in (0, 1):
        log = open(logs_dir / f"{name}-node{node_rank}.log", "w")
        nodes.append(subprocess.Popen(["bash", str(NODE_SCRIPT), *map(str, args)], cwd=REPO,
                                      env={**env, "SLURM_NODEID": str(node_rank)},
                                      stdout=log, stderr=subprocess.STDOUT))
    return nodes


def last_logged_step(output_dir) -> int:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
    return max((json.loads(line)["step"] for line in lines if '"loss"' in line), default=0)


def wait_for_step(output_dir, step: int, processes, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while last_logged_step(output_dir) < step:
        assert all(p.poll() is None for p in processes), "a process exited before the fault"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def training_ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The ranks DeepSpeed's launcher started under `launcher`, by rank."""
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if any(arg.startswith("--local_rank=") for arg in p.cmdline())]
    return sorted(ranks, key=lambda p: next(a for a in p.cmdline()
                                            if a.startswith("--local_rank=")))


def stop_all(processes) -> None:
    for process in processes:
        if process.poll() is None:
            for child in [*psutil.Process(process.pid).children(recursive=True), process]:
                child.kill()
        process.wait()


LOST_RANK_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, sweep_runs):
    """sweep_runs' `gt` options on two nodes: stopped by SIGUSR1 to node 1 after step 3 (and a
    SIGTERM while it writes its checkpoint); then resumed on two nodes (--resume latest, a
    checkpoint every 2 steps, --dist_timeout 20: neither changes a loss) until, 4 steps later,
    node 1's rank hangs (SIGSTOP): node 0's launcher cannot know, and its rank must find out
    within the timeout. (A rank that dies: conftest.py's `killed_run`.)"""
    reference = sweep_runs["gt"]
    root = tmp_path_factory.mktemp("two-nodes")
    out = root / "run"
    args = [str(out) if a == str(reference.path) else a for a in reference.argv]

    nodes = start_two_nodes(args, root, "stopped")
    try:
        wait_for_step(out, 3, nodes)
        # Only node 1 hears it: rank 0 learns through the per-step agreement.
        nodes[1].send_signal(signal.SIGUSR1)
        deadline = time.time() + 30  # a second signal while the checkpoint is written
        while not list(out.glob("checkpoints/*.tmp")) and nodes[1].poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        nodes[1].send_signal(signal.SIGTERM)
        stopped_codes = [n.wait(timeout=300) for n in nodes]
    finally:
        stop_all(nodes)
    stopped = {"codes": stopped_codes, "latest": latest_checkpoint(out),
               "steps": sorted(step_losses(out)), "summary": (out / "summary.json").exists(),
               "log": (root / "stopped-node0.log").read_text()}
    stopped_at = int(stopped["latest"].name.split("_")[1])

    nodes = start_two_nodes([*args, "--resume", "latest", "--save_every", 2, "--dist_timeout",
                             LOST_RANK_TIMEOUT_S], root, "resumed")
    try:
        wait_for_step(out, stopped_at + 4, nodes)
        [hung] = training_ranks(nodes[1])
        hung.send_signal(signal.SIGSTOP)
        lost_at = time.time()
        node0_code = nodes[0].wait(timeout=LOST_RANK_TIMEOUT_S + 60)
        waited = time.time() - lost_at
    finally:
        stop_all(nodes)
    resumed = {"node0_code": node0_code, "waited": waited, "stopped_at": stopped_at,
               "log": (root / "resumed-node0.log").read_text()}
    return reference, out, stopped, resumed


def test_sigusr1_saves_and_exits_cleanly(two_node_run):
    reference, _, stopped, _ = two_node_run
    steps = int(reference.argv[reference.argv.index("--max_steps") + 1])
    assert stopped["codes"] == [0, 0]
    stopped_at = int(stopped["latest"].name.split("_")[1])
    assert 3 <= stopped_at < steps
    assert stopped["steps"] == list(range(1, stopped_at + 1))
    assert f"stopped on SIGUSR1 after step {stopped_at} of {steps}" in stopped["log"]
    assert not stopped["summary"]  # what tells train.sbatch to requeue


def test_two_nodes_resume_and_train_like_one_node_with_two_ranks(two_node_run):
    """Bit for bit: two ranks reduce the same way on one node or two, and an exact-resume config
    restores every state exactly: each step the two nodes logged, before the stop and after the
    resume, has the one-node run's loss."""
    reference, out, _, resumed = two_node_run
    expected, losses = step_losses(reference.path), step_losses(out)
    assert sorted(losses) == list(range(1, len(losses) + 1))
    assert len(losses) >= resumed["stopped_at"] + 4
    assert losses == {step: expected[step] for step in losses}


def test_a_hung_rank_on_another_node_stops_rank_0_within_the_timeout(two_node_run):
    _, out, _, resumed = two_node_run
    assert resumed["node0_code"] == 1
    assert resumed["waited"] < LOST_RANK_TIMEOUT_S + 15, resumed["waited"]
    log = resumed["log"]
    assert "error: rank 0 lost contact with the other ranks" in log
    assert "Traceback" not in log
    latest = latest_checkpoint(out)
    assert f"Last good checkpoint: {latest}; continue with --resume latest" in log
    assert int(latest.name.split("_")[1]) >= resumed["stopped_at"] + 2
    weights = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=latest.name)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_gloo_transport_failures_count_as_a_lost_rank():
    """Where the surviving rank waits when the timeout fires decides the message: a blocking
    collective names gloo's source file, the wait on DeepSpeed's async all-gather does not (seen
    in CI: a raw traceback instead of the one-line error)."""
    from tsld_ds.run.cli import first_sentence, is_collective_failure

    blocking = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                            "[127.0.0.1]:14479: Connection reset by peer")
    asynchronous = RuntimeError("Application timeout caused pair closure")
    assert is_collective_failure(blocking) and is_collective_failure(asynchronous)
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert first_sentence(asynchronous) == "Application timeout caused pair closure"
