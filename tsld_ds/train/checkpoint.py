"""Checkpoints that never lose work: written under a temporary name, renamed when complete, and
only then recorded in `latest`; verified before they are used; pruned only once a newer one is in
place.

A checkpoint directory holds DeepSpeed's own files (partitioned model and optimizer states, the
lr scheduler) plus what an exact resume needs besides: the step, the data sampler's position and
every rank's RNG states. And two files of ours:

- `run_options.json`: the options that define the model, its quantizer and the objective
  (`tsld_ds.train.args.DEFINING_OPTIONS`); `--resume` refuses others, conversion uses these.
- `manifest.json`: every other file's size and SHA-256, so that a truncated or damaged file is
  named instead of loading silently or failing deep inside torch.load.
"""
import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from tsld_ds.errors import RunFailed, UsageError
from tsld_ds.train.args import differing_options
from tsld_ds.train.hooks import TrainHooks

LATEST = "latest"
OPTIONS_FILE = "run_options.json"
MANIFEST_FILE = "manifest.json"
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
UNIVERSAL_SUFFIX = "_universal"  # tsld_ds.train.universal's conversions, beside their source
_TAG = re.compile(r"^step_(\d+)$")


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


def save_checkpoint(engine, output_dir, step: int, client_state: dict, *, options: dict,
                    needed_bytes: int, keep: int | None, hooks: TrainHooks) -> Path:
    """Writes checkpoints/step_N atomically on every rank, with the run's defining `options` and
    the manifest; then deletes checkpoints beyond the newest `keep`. Returns its final path.
    A write that fails for lack of space removes its partial files and raises RunFailed."""
    root = checkpoint_dir(output_dir)
    tag = tag_for_step(step)
    tmp = root / (tag + _TMP_SUFFIX)
    final = root / tag
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state,
                               save_latest=False)
        torch.save(_rng_state(), tmp / f"rng_state_rank{rank}.pt")
        hooks.checkpoint_files_written(step)
        dist.barrier()  # every rank's files are complete
        manifest = _manifest(tmp)
        if rank == 0:
            (tmp / OPTIONS_FILE).write_text(json.dumps(options, indent=2) + "\n")
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except (OSError, RuntimeError) as e:
        if not _out_of_space(e, root, needed_bytes):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(f"checkpoint {tag} could not be written: {root} is out of space "
                        f"({format_bytes(shutil.disk_usage(root).free)} free; a checkpoint needs "
                        f"about {format_bytes(needed_bytes)}). Its partial files were removed; "
                        f"`latest` still names {_latest_name(root)}. Free some space (or pass "
                        "--keep_checkpoints) and continue with --resume latest") from None
    if rank == 0:
        _commit(root, tag)
        if keep is not None:
            _prune(root, keep)
    dist.barrier()
    return final


def _commit(root: Path, tag: str) -> None:
    # An older save of this step (a run resumed from an earlier checkpoint) may be what `latest`
    # names: it is renamed aside and deleted only once the new one is in its place, so `latest`
    # lacks a directory for two renames at most, not for a whole deletion.
    final, replaced = root / tag, root / (tag + _OLD_SUFFIX)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(root / (tag + _TMP_SUFFIX), final)
    shutil.rmtree(replaced, ignore_errors=True)
    latest_tmp = root / (LATEST + _TMP_SUFFIX)
    latest_tmp.write_text(tag + "\n")
    os.replace(latest_tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoints (and their universal conversions); the one
    `latest` names stays whatever its age."""
    latest = (root / LATEST).read_text().strip()
    for old in committed_checkpoints(root)[:-keep]:
        if old.name != latest:
            shutil.rmtree(old.parent / (old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
            shutil.rmtree(old)


def committed_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (a checkpoints/ directory), oldest first."""
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def _out_of_space(error: Exception, root: Path, needed_bytes: int) -> bool:
    # torch.save reports a full disk only as "[enforce fail at inline_container.cc] unexpected
    # pos": what is left on the disk tells.
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return shutil.disk_usage(root).free < needed_bytes


def format_bytes(size: int) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e8 else f"{size / 1e6:.3g} MB"


def checkpoint_bytes(engine) -> int:
    """About the size of one checkpoint: fp32 master weights and Adam's two moments (12 bytes)
    per trainable parameter, on all ranks together."""
    return 12 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                    if p.requires_grad)


def check_room(output_dir, needed_bytes: int) -> None:
    """Refuses to start training when the output filesystem cannot hold one checkpoint."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise UsageError(f"--output_dir {output_dir} has {format_bytes(free)} free; one "
                         f"checkpoint of this run needs about {format_bytes(needed_bytes)}")


def _latest_name(root: Path) -> str:
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else "no checkpoint"


def _share(items: list) -> list:
    """This rank's share of `items` (all of them without a process group)."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _gathered(part: dict) -> dict:
    """Every rank's `part` merged (just `part` without a process group)."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for p in parts for key, value in p.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict:
    """{file: {bytes, sha256}} of every file in `directory`, the ranks hashing a share each."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    mine = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in _share(files)}
    return {"files": dict(sorted(_gathered(mine).items()))}


def damaged_files(path: Path) -> list[str] | None:
    """What is wrong with the files of the checkpoint at `path` against its manifest ([] when
    nothing is); None for a checkpoint written before manifests. Collective under a process
    group: the ranks check a share each."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return None
    try:
        expected = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError):
        return [f"{MANIFEST_FILE}: not readable"]
    problems = {}
    for name in _share(sorted(expected)):
        file, want = path / name, expected[name]
        if not file.is_file():
            problems[name] = f"{name}: missing"
        elif file.stat().st_size != want["bytes"]:
            problems[name] = (f"{name}: {file.stat().st_size} bytes, {want['bytes']} written "
                              "(truncated or overwritten)")
        elif _sha256(file) != want["sha256"]:
            problems[name] = f"{name}: contents changed since it was written (SHA-256 differs)"
    problems = _gathered(problems)
    return [problems[name] for name in sorted(problems)]


def verify(path: Path) -> None:
    """Refuses a damaged checkpoint, naming its damaged files and the newest intact checkpoint
    beside it. Collective under a process group."""
    damaged = damaged_files(path)
    if not damaged:
        return
    newest = "no other intact checkpoint is there"
    for other in reversed(committed_checkpoints(path.parent)):
        if other != path and damaged_files(other) == []:
            newest = f"the newest intact checkpoint is {other}"
            break
    raise UsageError(f"checkpoint {path} is damaged: {'; '.join(damaged)}; {newest}")


def saved_options(path: Path) -> dict | None:
    """The defining options the checkpoint at `path` was written with (None before they were
    recorded)."""
    file = path / OPTIONS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def check_options(path: Path, args) -> None:
    """Refuses to resume the checkpoint at `path` with options that define another model,
    quantizer or objective."""
    saved = saved_options(path)
    differing = differing_options(saved, args) if saved is not None else []
    if differing:
        raise UsageError(f"--resume {path}: the checkpoint was written with other options: "
                         f"{'; '.join(differing)}. Resume with its options, or start a new run "
                         "in another --output_dir")


class CheckpointSaver:
    """Saves one run's checkpoints, each step at most once: a stop right after a periodic save,
    or a finished run resumed, keeps the checkpoint already on disk instead of writing it again."""

    def __init__(self, engine, output_dir, saved_step: int | None, *, options: dict,
                 needed_bytes: int, keep: int | None, hooks: TrainHooks):
        self.engine, self.output_dir, self.saved_step = engine, output_dir, saved_step
        self.settings = dict(options=options, needed_bytes=needed_bytes, keep=keep, hooks=hooks)

    def save(self, step: int, client_state: dict) -> Path:
        if step != self.saved_step:
            save_checkpoint(self.engine, self.output_dir, step, client_state, **self.settings)
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
