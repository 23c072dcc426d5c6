"""`launch/convert.py` / `tsld-convert`: a training run's checkpoint -> a Hugging Face directory
(fake-quant `hf` or `packed`) or a GGUF file, with a JSON summary on stdout."""
import argparse
import json

from tsld_ds.convert.outputs import check_target, output_path, record_output, written_beside
from tsld_ds.convert.report import Report
from tsld_ds.errors import EXIT_COMPLETED, RunFailed, UsageError
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
                   help="replace an earlier conversion's --output (a directory it wrote, with "
                   "nothing else in it, or a GGUF file it wrote; anything else is refused): the "
                   "new output is written beside it and swapped in only once complete, so a "
                   "failed conversion leaves the old one")
    return p


def convert(checkpoint, output, fmt: str = "hf", dtype: str | None = None,
            overwrite: bool = False) -> dict:
    """The conversion itself; returns the summary."""
    # Heavy imports here, after --help and option errors.
    from tsld_ds.convert import gguf_file
    from tsld_ds.convert.source import (
        STUDENT_PREFIX,
        NonFiniteWeights,
        consolidated_weights,
        find_checkpoint,
        finite_checked,
        nonfinite_tensors,
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
    tensors = fake_quant_tensors(model, finite_checked(weights), STUDENT_PREFIX,
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
            if fmt != "gguf":  # a GGUF carries its mark in its metadata
                record_output(tmp, fmt, source.step)
    except ValueError as e:  # weights the format cannot hold (e.g. off a bf16 run's grid)
        if fmt == "hf":  # which holds any: a bug, whose traceback shows
            raise
        raise UsageError(f"--format {fmt}: {e} (nothing written; use --format hf)") from None
    except NonFiniteWeights:
        found, total = nonfinite_tensors(weights)
        raise UsageError(f"checkpoint '{source.path}' holds NaN or inf in {len(found)} of its "
                         f"{total} tensors (first: {found[0][len(STUDENT_PREFIX):]}); nothing "
                         "written: convert an earlier checkpoint") from None
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
