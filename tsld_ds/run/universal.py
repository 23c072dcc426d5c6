"""Resuming at another world size through DeepSpeed's universal checkpoint.

A ZeRO checkpoint is partitioned for the world size that wrote it. When `--resume` finds another
one, rank 0 converts the checkpoint with `deepspeed.checkpoint.ds_to_universal` into
`checkpoints/step_N_universal/` (once; later resumes reuse it) before the engine is built, the
DeepSpeed config's `checkpoint.load_universal` makes every rank's engine load that, and the data
position is translated:

- exact: model weights, fp32 master weights, Adam moments and step count, the lr schedule, the
  step number, and the data position whenever the samples consumed in the epoch (per-rank count
  x old world size) divide by the new world size — then the next samples are exactly the ones the
  uninterrupted run would take next, in the same order. Losses match the uninterrupted run's when
  the global batch (micro batch x accumulation x world size) is kept the same.
- approximate: otherwise the position rounds down to a multiple of the new world size (a few
  samples of the epoch are seen twice); per-epoch lengths follow the new world size, so epoch
  boundaries may fall at other steps; ranks beyond the old world size have no saved RNG state
  and keep the seeded one (only dropout uses it).

By hand: `python -m tsld_ds.run.universal OUTPUT_DIR/checkpoints/step_N` writes the same
`step_N_universal/`; `--resume` at the new world size then uses it.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tsld_ds.errors import UsageError
from tsld_ds.run import checkpoint as ckpt

_COMPLETE = "universal_complete"
MODEL_STATES = "*model_states.pt"


def model_states_header(path: Path) -> dict:
    """Rank 0's DeepSpeed model-states file of the checkpoint at `path` (memory-mapped, its module
    weights left out): world size, step, the DeepSpeed config, the client state."""
    files = sorted(Path(path).glob(MODEL_STATES))
    if not files:
        raise UsageError(f"'{path}' holds no DeepSpeed model-states files")
    try:
        state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise UsageError(f"cannot read DeepSpeed checkpoint file '{files[0]}': {e}") from None
    if not isinstance(state, dict) or "dp_world_size" not in state:
        raise UsageError(f"'{files[0]}' is not a DeepSpeed model-states file")
    return {k: v for k, v in state.items() if k != "module"}


def saved_world_size(path: Path) -> int:
    """Data-parallel world size that wrote the checkpoint at `path`."""
    return model_states_header(path)["dp_world_size"]


def universal_path(path: Path) -> Path:
    return Path(path).parent / (Path(path).name + ckpt.UNIVERSAL_SUFFIX)


def convert_to_universal(path: Path) -> Path:
    """`path`'s universal form beside it (built once, atomically: a crash leaves no marker)."""
    from deepspeed.checkpoint import ds_to_universal

    out = universal_path(path)
    if (out / _COMPLETE).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    # One worker each: the conversion runs inside a training rank (or a small machine).
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(path), output_folder=str(out), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    for rng_file in Path(path).glob("rng_state_rank*.pt"):
        shutil.copy2(rng_file, out / rng_file.name)
    (out / _COMPLETE).write_text(f"converted from {path}\n")
    return out


def translate_sampler(state: dict, saved_world: int, world: int) -> dict:
    """The per-rank sampler position at `world` ranks that continues where `saved_world` ranks
    stopped: the same number of samples consumed in the epoch, rounded down to a multiple of
    `world`."""
    return {"epoch": state["epoch"], "consumed": state["consumed"] * saved_world // world}


def prepare_resume(path: Path, ds_config: dict) -> None:
    """Before the engine exists: when `path` was written at another world size, rank 0 converts
    it (once) and `ds_config` is set to load universal checkpoints. Collective."""
    saved, world = saved_world_size(path), dist.get_world_size()
    if saved == world:
        return
    if dist.get_rank() == 0:
        print(f"checkpoint {path} was written by {saved} ranks, resuming on {world}: converting "
              f"it to a universal checkpoint in {universal_path(path)}", file=sys.stderr)
        convert_to_universal(path)
    dist.barrier()
    ds_config.setdefault("checkpoint", {})["load_universal"] = True


def load_checkpoint(engine, path: Path) -> dict:
    """`checkpoint.load_checkpoint` of a resume `prepare_resume` prepared, at any world size,
    with the data position translated to this one."""
    saved, world = saved_world_size(path), dist.get_world_size()
    state = ckpt.load_checkpoint(engine, universal_path(path) if saved != world else path)
    state["sampler"] = translate_sampler(state["sampler"], saved, world)
    return state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tsld_ds.run.universal",
        description="Convert a tsld-ds checkpoint into DeepSpeed's universal format (written "
        "beside it as step_N_universal/), so that --resume works at another world size. "
        "--resume does this by itself when it finds a world-size mismatch.")
    p.add_argument("checkpoint", help="OUTPUT_DIR/checkpoints/step_N")
    path = Path(p.parse_args(argv).checkpoint)
    if not path.is_dir() or not sorted(path.glob(MODEL_STATES)):
        print(f"error: '{path}' is not a DeepSpeed checkpoint directory", file=sys.stderr)
        return 2
    print(convert_to_universal(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
