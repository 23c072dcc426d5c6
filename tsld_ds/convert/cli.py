"""`launch/convert.py` / `tsld-convert`: a training run's checkpoint -> a Hugging Face directory
(fake-quant `hf` or `packed`) or a GGUF file, with a JSON summary on stdout."""
import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path

from tsld_ds.convert.report import Report
from tsld_ds.errors import EXIT_COMPLETED, RunFailed, UsageError
from tsld_ds.files import nearest_existing_parent
from tsld_ds.quant import quantized_modules
from tsld_ds.quant.fake_quant import DTYPES, fake_quant_tensors
from tsld_ds.run.cli import entry_point, run_command

FORMATS = ("hf", "packed", "gguf")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/convert.py",
        description="Convert a tsld-ds training checkpoint (any world size, ZeRO-2 or ZeRO-3) into "
        "a model to load, evaluate and ship. Runs on the CPU, without a GPU or process group, "
        "holding at most one full-precision copy of the model. Prints a JSON summary: tensors "
        "and bytes written, and the check that every quantized Linear holds at most 3 distinct "
        "values per row (2 bits) or 2^b per group.")
    p.add_argument("--checkpoint", required=True,
                   help="a training --output_dir (its latest checkpoint), its checkpoints/ folder, "
                   "or one checkpoints/step_N directory")
    p.add_argument("--output", required=True,
                   help="directory to write (hf, packed); for gguf a .gguf file, or a directory "
                   "that receives model.gguf")
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: Hugging Face directory with the dequantized quantized weights "
                   "(stock transformers, vLLM and lm-eval load it); packed: the same directory "
                   "with compressed-tensors pack-quantized 2/4-bit codes and scales for the "
                   "quantized Linears (load with tsld_ds.load_packed); gguf: llama.cpp file with "
                   "ternary weights as TQ2_0 (rows a multiple of 256) or 4-bit min-max weights in "
                   "groups of 32 as Q4_1 (LLaMA architecture). "
                   "Default: hf")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="dtype of the written floating tensors (hf, packed); default: the "
                   "training dtype. gguf always writes F16 matrices and F32 norms")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output: the new output is written beside it and "
                   "swapped in only once complete, so a failed conversion leaves the old one")
    return p


def output_path(output: str, fmt: str) -> Path:
    """The path to write: --output, or model.gguf in it for a gguf directory. Refused at once,
    before the checkpoint is looked for, where it cannot be created (a file on its way)."""
    path = Path(output).expanduser()
    if fmt == "gguf" and path.suffix != ".gguf":
        path = path / "model.gguf"
    existing = nearest_existing_parent(path.parent)
    if not existing.is_dir():
        raise UsageError(f"--output '{path}' cannot be written: '{existing}' is a file, not a "
                         "directory")
    return path


def check_target(path: Path, fmt: str, overwrite: bool, run_dir: Path) -> None:
    """`path` is not the run being read nor anything inside it or around it, and not an existing
    output unless `overwrite`."""
    target, run = path.resolve(), run_dir.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise UsageError(f"--output '{path}' is, holds or lies inside the run being converted "
                         f"({run_dir}); write it beside the run, e.g. --output {run_dir}-{fmt}")
    if path.exists() and (path.is_file() or any(path.iterdir())):
        if not overwrite:
            raise UsageError(f"--output '{path}' already exists; pass --overwrite to replace it")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"--output '{path}' is a directory that is not a model (no "
                             "config.json): --overwrite replaces only an earlier output")


@contextlib.contextmanager
def written_beside(path: Path):
    """Yields a temporary sibling of `path` to write; when the block completes, the sibling
    takes `path`'s place (an existing `path` is removed only then). If the block fails, the
    sibling is removed and `path` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*-*"):  # left by a conversion killed midway
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            if ".old-" in stale.name and not path.exists():  # killed between the two renames
                os.replace(stale, path)
            else:
                _remove(stale)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    _remove(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def convert(checkpoint, output, fmt: str = "hf", dtype: str | None = None,
            overwrite: bool = False) -> dict:
    """The conversion itself; returns the summary."""
    # Heavy imports here, after --help and option errors.
    from tsld_ds.convert import gguf_file
    from tsld_ds.convert.source import (
        STUDENT_PREFIX,
        consolidated_weights,
        find_checkpoint,
        run_tokenizer,
        student_skeleton,
    )
    from tsld_ds.convert.writers import write_hf, write_packed
    from tsld_ds.run.checkpoint import verify

    out = output_path(output, fmt)
    source = find_checkpoint(checkpoint)
    check_target(out, fmt, overwrite, source.path.parent.parent)
    model = student_skeleton(source.config)
    tokenizer = run_tokenizer(source.config)
    cfg = next((m.cfg for _, m in quantized_modules(model)), None)
    if fmt == "packed" and cfg is None:
        raise UsageError("--format packed needs a quantized run; this one trained in full "
                         "precision (--bits 16): use --format hf")
    if fmt == "gguf":
        gguf_file.check_supported(model, cfg, tokenizer, source.training_dtype)
    verify(source.path)
    weights = consolidated_weights(source)
    check_names(model, weights, STUDENT_PREFIX, source.path)
    tensors = fake_quant_tensors(model, weights, STUDENT_PREFIX,
                                 compute_dtype=source.training_dtype)
    report = Report(format=fmt, output=out, checkpoint=source.path, step=source.step,
                    quantization=cfg.to_dict() if cfg else None)
    torch_dtype = DTYPES[dtype] if dtype else source.training_dtype
    try:
        with written_beside(out) as tmp:
            if fmt == "hf":
                write_hf(model, tensors, tokenizer, tmp, torch_dtype, report)
            elif fmt == "packed":
                write_packed(model, tensors, tokenizer, tmp, torch_dtype, report)
            else:
                gguf_file.write_gguf(model, tensors, tokenizer, cfg, tmp, report)
    except ValueError as e:  # weights the format cannot hold (e.g. off a bf16 run's grid)
        raise UsageError(f"--format {fmt}: {e} (nothing written; use --format hf)") from None
    return report.as_dict()


def check_names(model, weights: dict, prefix: str, path) -> None:
    """The checkpoint must hold exactly the tensors of the student rebuilt from args.json."""
    expected = set(model.state_dict())
    got = {k[len(prefix):] for k in weights if k.startswith(prefix)}
    if expected != got:
        raise UsageError(f"checkpoint '{path}' does not match the model rebuilt from its run's "
                         f"args.json: missing {sorted(expected - got)[:3]}, unexpected "
                         f"{sorted(got - expected)[:3]}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        summary = convert(args.checkpoint, args.output, args.format, args.dtype, args.overwrite)
        print(json.dumps(summary, indent=2))
        if summary["distinct_values"]["check"] != "pass":
            raise RunFailed("quantized Linears with more distinct values than their bits allow: "
                            f"{summary['distinct_values']['failing']}")
        return EXIT_COMPLETED

    return run_command(work)


def run() -> None:
    """Entry point of launch/convert.py and `tsld-convert`."""
    entry_point(main)
