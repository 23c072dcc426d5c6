"""Several tsld-ds commands in one launch, one after the other:

    deepspeed --num_gpus N tests/drivers/run_many.py PLAN.json

Tests that compare or sweep runs share one start of the launcher and its ranks: importing and
starting are most of a tiny run's time. The ranks make one process group, and each command is
the `main(argv)` its launch/ script calls, which uses a group it did not make as it is.
PLAN.json: {"commands": [{"command": "train" | "cache", "argv": [...], "fault": SPEC}, ...]},
SPEC optional (train_with_faults.py's TSLD_INJECT_FAULT). Every rank prints `=== command I ===`
to stdout and stderr before command I, and rank 0 writes each command's exit code and seconds
to PLAN.codes.json.
A command that breaks the group (a lost rank) cannot share a launch.
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from train_with_faults import FaultHooks  # noqa: E402

from tsld_ds.cache import cli as cache_cli  # noqa: E402
from tsld_ds.run.distributed import init_distributed  # noqa: E402
from tsld_ds.train import cli as train_cli  # noqa: E402

GROUP_TIMEOUT_S = 600


def run_command(entry: dict) -> int:
    if entry["command"] == "cache":
        return cache_cli.main(entry["argv"])
    if not entry.get("fault"):
        return train_cli.main(entry["argv"])
    hooks = FaultHooks(entry["fault"])
    with hooks.installed():
        return train_cli.main(entry["argv"], hooks)


def main() -> None:
    plan_path = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    commands = json.loads(plan_path.read_text())["commands"]
    init_distributed(GROUP_TIMEOUT_S)
    ended = []
    for i, entry in enumerate(commands):
        dist.barrier()  # the previous command's output is out on every rank
        for stream in (sys.stdout, sys.stderr):
            print(f"=== command {i} ===", file=stream, flush=True)
        started = time.time()
        ended.append({"code": run_command(entry), "seconds": time.time() - started})
        sys.stdout.flush()
        sys.stderr.flush()
    dist.barrier()
    if dist.get_rank() == 0:
        plan_path.with_suffix(".codes.json").write_text(json.dumps(ended))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as launch/train.py does: no C++ thread outlives the process group


if __name__ == "__main__":
    main()
