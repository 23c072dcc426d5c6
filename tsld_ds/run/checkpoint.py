"""Checkpoints that never lose work: written under a temporary name, renamed when complete, and
only then recorded in `latest`; verified before they are used; pruned only once a newer one is in
place.

A checkpoint directory holds DeepSpeed's own files (partitioned model and optimizer states, the
lr scheduler) plus what an exact resume needs besides: the step, the data sampler's position and
every rank's RNG states. And two files of ours:

- `run_options.json`: the options that define the model, its quantizer and the objective
  (`tsld_ds.run.config.DEFINING_OPTIONS`); `--resume` refuses others, conversion uses these.
- `manifest.json`: every other file's size and SHA-256, so that a truncated or damaged file is
  named instead of loading silently or failing deep inside torch.load.
"""
import errno
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from tsld_ds.errors import RunFailed, UsageError
from tsld_ds.files import nearest_existing_parent, sha256_file, sync_directory, write_atomically

LATEST = "latest"
OPTIONS_FILE = "run_options.json"
MANIFEST_FILE = "manifest.json"
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
_DELETING_SUFFIX = ".deleting"
UNIVERSAL_SUFFIX = "_universal"  # tsld_ds.run.universal's conversions, beside their source
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
                    needed_bytes: int, keep: int | None,
                    on_files_written: Callable[[int], None] | None = None) -> Path:
    """Writes checkpoints/step_N atomically on every rank, with the run's defining `options` and
    the manifest, synced to disk before `latest` names it; then deletes older checkpoints beyond
    the newest `keep`. Returns its final path. A write that fails for lack of space (or quota)
    removes its partial files and raises RunFailed. `on_files_written(step)` runs once this
    rank's files are on disk, before the checkpoint is committed."""
    root = checkpoint_dir(output_dir)
    tag = tag_for_step(step)
    tmp = root / (tag + _TMP_SUFFIX)
    rank = dist.get_rank()
    if rank == 0:
        _sweep_debris(root)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state,
                               save_latest=False)
        torch.save(_rng_state(), tmp / f"rng_state_rank{rank}.pt")
        if on_files_written is not None:
            on_files_written(step)
        if rank == 0:
            (tmp / OPTIONS_FILE).write_text(json.dumps(options, indent=2) + "\n")
        dist.barrier()  # every rank's files are complete
        manifest = _manifest(tmp)
        if rank == 0:
            write_atomically(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
            sync_directory(tmp)
    except (OSError, RuntimeError) as e:
        if not _write_failed(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(f"checkpoint {tag} could not be written to {root}: no space left or over "
                        f"quota ({format_bytes(shutil.disk_usage(root).free)} free; a checkpoint "
                        f"needs about {format_bytes(needed_bytes)}). Its partial files were "
                        f"removed; `latest` still names {_latest_name(root)}. Free some space (or "
                        "pass --keep_checkpoints) and continue with --resume latest") from None
    if rank == 0:
        _commit(root, tag)
        if keep is not None:
            _prune(root, keep)
    dist.barrier()
    return root / tag


def _sweep_debris(root: Path) -> None:
    """Removes what crashed saves, commits and prunes left (never a committed checkpoint)."""
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.endswith((_TMP_SUFFIX, _OLD_SUFFIX, _DELETING_SUFFIX)):
                shutil.rmtree(path, ignore_errors=True)


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
    write_atomically(root / LATEST, tag + "\n")
    sync_directory(root)


def _prune(root: Path, keep: int) -> None:
    """Keeps the `keep` newest checkpoints up to the one `latest` names, which is one of them;
    older ones (and their universal conversions) go. Newer ones than `latest`, left by a run
    resumed from an earlier checkpoint, are not this run's to delete: it replaces them as it
    reaches their steps. A checkpoint is renamed before it is deleted, so a kill midway never
    leaves a half-deleted one that looks complete."""
    latest = _step_of(root / (root / LATEST).read_text().strip())
    older = [p for p in committed_checkpoints(root) if _step_of(p) < latest]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old.parent / (old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        doomed = old.parent / (old.name + _DELETING_SUFFIX)
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def _step_of(path: Path) -> int:
    return int(_TAG.match(path.name).group(1))


def committed_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (a checkpoints/ directory), oldest first."""
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)] \
        if root.is_dir() else []
    return sorted(found, key=_step_of)


def _write_failed(error: Exception) -> bool:
    """Whether `error` is a write that the disk or the quota refused. torch.save reports that
    only as its archive writer's "unexpected pos" or "failed writing"."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("unexpected pos", "failed writing", "file write failed",
                                          "No space left", "Disk quota exceeded"))


def format_bytes(size: int) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e8 else f"{size / 1e6:.3g} MB"


def checkpoint_bytes(engine) -> int:
    """About the size of one checkpoint: fp32 master weights and Adam's two moments (12 bytes)
    per trainable parameter, on all ranks together."""
    return 12 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                    if p.requires_grad)


def check_room(output_dir, needed_bytes: int) -> None:
    """Refuses to start training when the output filesystem cannot hold one checkpoint."""
    free = shutil.disk_usage(nearest_existing_parent(output_dir)).free
    if free < needed_bytes:
        raise UsageError(f"--output_dir {output_dir} has {format_bytes(free)} free; one "
                         f"checkpoint of this run needs about {format_bytes(needed_bytes)}")


def _latest_name(root: Path) -> str:
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else "no checkpoint"


# The rank in a checkpoint file's name (DeepSpeed's zero_pp_rank_R files, our rng_state_rankR):
# the rank that wrote it hashes it, reading what its own node's page cache holds.
_WRITER = re.compile(r"(?:zero_pp_rank_|rng_state_rank)(\d+)")


def _mine(names: list) -> list:
    """The files of `names` this rank hashes: those it wrote; rank 0 also the unnumbered ones.
    All of them without a process group."""
    if not dist.is_initialized():
        return names
    rank, world = dist.get_rank(), dist.get_world_size()
    return [n for n in names
            if (int(_WRITER.search(n).group(1)) % world if _WRITER.search(n) else 0) == rank]


def _listed(directory: Path) -> list:
    """The names of the files in `directory`: listed by rank 0 alone (one metadata walk, not one
    per rank on a shared filesystem) and sent to the others."""
    names = [sorted(p.name for p in directory.iterdir() if p.is_file())] \
        if not dist.is_initialized() or dist.get_rank() == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    return names[0]


def _gathered(part: dict) -> dict:
    """Every rank's `part` merged (just `part` without a process group)."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for p in parts for key, value in p.items()}


def _manifest(directory: Path) -> dict:
    """{file: {bytes, sha256}} of every file in `directory`, each rank hashing (and syncing to
    disk) the files it wrote."""
    mine = {name: {"bytes": (directory / name).stat().st_size,
                   "sha256": sha256_file(directory / name, sync=True)}
            for name in _mine(_listed(directory))}
    return {"files": dict(sorted(_gathered(mine).items()))}


def damaged_files(path: Path) -> list[str] | None:
    """What is wrong with the files of the checkpoint at `path` against its manifest ([] when
    nothing is); None for a checkpoint written before manifests and defining options were
    recorded. Collective under a process group: each rank checks the files it wrote."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return [f"{MANIFEST_FILE}: missing"] if (path / OPTIONS_FILE).is_file() else None
    try:
        expected = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError):
        return [f"{MANIFEST_FILE}: not readable"]
    problems = {}
    for name in _mine(sorted(expected)):
        file, want = path / name, expected[name]
        if not file.is_file():
            problems[name] = f"{name}: missing"
        elif file.stat().st_size != want["bytes"]:
            problems[name] = (f"{name}: {file.stat().st_size} bytes, {want['bytes']} written "
                              "(truncated or overwritten)")
        elif sha256_file(file) != want["sha256"]:
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
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        raise UsageError(f"checkpoint {path}: {OPTIONS_FILE} is damaged (not JSON)") from None


class NonFiniteWeights(RunFailed):
    """The weights to be saved hold NaN/inf: no checkpoint to go on from; none was written."""


def nonfinite_parameters(module: torch.nn.Module, device) -> list[str]:
    """The names of `module`'s parameters that hold NaN/inf on any rank; under ZeRO-3 each rank
    checks its own shard (`ds_tensor`, which may be in host memory when parameters are
    offloaded). Collective, on `device` (the engine's)."""
    named = list(module.named_parameters())
    # One flag per tensor, gathered where the collective runs: one device sync, not one a tensor.
    local = torch.stack([torch.isfinite(getattr(p, "ds_tensor", p)).all().logical_not().to(device)
                         for _, p in named]).to(torch.int32)
    dist.all_reduce(local)
    return [name for (name, _), bad in zip(named, local.tolist()) if bad]


class CheckpointSaver:
    """Saves one run's checkpoints: every `every` steps (0: only when the run ends or stops), and
    each step at most once: a stop right after a periodic save, or a finished run resumed, keeps
    the checkpoint already on disk instead of writing it again. Only finite weights are saved: a
    checkpoint is called good (`latest`) only when every rank's shard of every weight is finite.
"""

    def __init__(self, engine, output_dir, saved_step: int | None, *, every: int, options: dict,
                 needed_bytes: int, keep: int | None,
                 on_files_written: Callable[[int], None] | None = None):
        self.engine, self.output_dir, self.saved_step = engine, output_dir, saved_step
        self.every = every
        self.settings = dict(options=options, needed_bytes=needed_bytes, keep=keep,
                             on_files_written=on_files_written)

    def maybe_save(self, step: int, client_state: dict) -> None:
        if self.every and step % self.every == 0:
            self.save_if_finite(step, client_state)

    def save(self, step: int, client_state: dict) -> Path:
        """Checkpoint `step`'s path; NonFiniteWeights (nothing written) for NaN/inf weights."""
        if step != self.saved_step:
            bad = nonfinite_parameters(self.engine.module, self.engine.device)
            if bad:
                raise NonFiniteWeights(
                    f"the weights after step {step} are not finite ({len(bad)} tensors, e.g. "
                    f"{bad[0]}), so no checkpoint of them was written; `latest` still names "
                    f"{_latest_name(checkpoint_dir(self.output_dir))}")
            save_checkpoint(self.engine, self.output_dir, step, client_state, **self.settings)
            self.saved_step = step
        return checkpoint_dir(self.output_dir) / tag_for_step(step)

    def save_if_finite(self, step: int, client_state: dict) -> Path | None:
        """`save`, or a warning and None where the weights are not finite (the run goes on: the
        NaN/inf guard stops it once its losses are)."""
        try:
            return self.save(step, client_state)
        except NonFiniteWeights as e:
            if dist.get_rank() == 0:
                tqdm.write(f"warning: {e}", file=sys.stderr)  # below the progress bar
            return None


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
        if not path.is_dir():  # removed by hand, or lost with a disk
            intact = committed_checkpoints(checkpoint_dir(output_dir))
            offer = f"; the newest checkpoint there is {intact[-1]}: pass --resume " \
                f"{intact[-1]}" if intact else "; no other checkpoint is there"
            raise UsageError(f"--resume latest: `latest` names {path.name}, which is missing"
                             + offer)
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
