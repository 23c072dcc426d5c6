"""Checkpoints that never lose work: written under a temporary name, renamed when complete, and
only then recorded in `latest`.

A checkpoint directory holds DeepSpeed's own files (partitioned model and optimizer states, the
lr scheduler) plus what an exact resume needs besides: the step, the data sampler's position and
every rank's RNG states.
"""
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from tsld_ds.errors import UsageError
from tsld_ds.train.hooks import TrainHooks

LATEST = "latest"
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
_TAG = re.compile(r"^step_\d+$")


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:07d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if get_accelerator().device_name() != "cpu":  # the GPU's own generator (dropout there)
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


def save_checkpoint(engine, output_dir, step: int, client_state: dict,
                    hooks: TrainHooks) -> Path:
    """Writes checkpoints/step_N atomically on every rank; returns its final path."""
    root = checkpoint_dir(output_dir)
    tag = tag_for_step(step)
    tmp_tag = tag + _TMP_SUFFIX
    final = root / tag
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # debris of an earlier crash
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), root / tmp_tag / f"rng_state_rank{rank}.pt")
    hooks.checkpoint_files_written(step)
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        # An older save of this step (a run resumed from an earlier checkpoint) may be what
        # `latest` names: it is renamed aside and deleted only once the new one is in its place,
        # so `latest` lacks a directory for two renames at most, not for a whole deletion.
        replaced = root / (tag + _OLD_SUFFIX)
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(root / tmp_tag, final)
        shutil.rmtree(replaced, ignore_errors=True)
        latest_tmp = root / (LATEST + _TMP_SUFFIX)
        latest_tmp.write_text(tag + "\n")
        os.replace(latest_tmp, root / LATEST)
    dist.barrier()
    return final


class CheckpointSaver:
    """Saves one run's checkpoints, each step at most once: a stop right after a periodic save,
    or a finished run resumed, keeps the checkpoint already on disk instead of writing it again."""

    def __init__(self, engine, output_dir, saved_step: int | None, hooks: TrainHooks):
        self.engine, self.output_dir, self.saved_step = engine, output_dir, saved_step
        self.hooks = hooks

    def save(self, step: int, client_state: dict) -> Path:
        if step != self.saved_step:
            save_checkpoint(self.engine, self.output_dir, step, client_state, self.hooks)
            self.saved_step = step
        return checkpoint_dir(self.output_dir) / tag_for_step(step)


def latest_checkpoint(output_dir) -> Path | None:
    root = checkpoint_dir(output_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    return root / marker.read_text().strip()


def resolve_resume(resume: str, output_dir) -> Path:
    """`latest` or a checkpoint directory -> the checkpoint directory, checked."""
    if resume == LATEST:
        path = latest_checkpoint(output_dir)
        if path is None:
            raise UsageError(f"--resume latest: no complete checkpoint in "
                             f"{checkpoint_dir(output_dir)}")
    else:
        path = Path(resume)
    if not path.is_dir() or not _TAG.match(path.name):
        raise UsageError(f"--resume {resume}: '{path}' is not a tsld-ds checkpoint directory "
                         "(expected OUTPUT_DIR/checkpoints/step_N)")
    return path


def load_checkpoint(engine, path: Path) -> dict:
    """Restores engine, optimizer, scheduler and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                             load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise UsageError(f"cannot load checkpoint '{path}'")
    rng_file = path / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
