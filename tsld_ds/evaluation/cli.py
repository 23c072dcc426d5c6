"""`launch/eval.py` / `tsld-eval`: perplexity (training's method) and lm-eval tasks of a run, a
converted directory or any Hugging Face model, as a JSON report."""
import argparse
import json
from pathlib import Path

import torch

from tsld_ds.errors import EXIT_COMPLETED, UsageError
from tsld_ds.models import check_model_source
from tsld_ds.quant.fake_quant import DTYPES
from tsld_ds.run.cli import entry_point, run_command
from tsld_ds.run.options import defaults as training_defaults

# Data options a run directory supplies from its args.json when not given here.
RUN_DEFAULTS = {"dataset": "dataset", "dataset_config": "dataset_config",
                "text_column": "text_column", "block_size": "block_size", "seed": "seed",
                "max_blocks": "eval_max_blocks"}


def build_parser() -> argparse.ArgumentParser:
    training = training_defaults()
    p = argparse.ArgumentParser(
        prog="launch/eval.py",
        description="Evaluate a model: validation perplexity by the method training uses "
        "(the validation split's rows: non-overlapping packed blocks of text, or instruction "
        "examples scored on their responses; NLL summed over all predicted tokens) and, when "
        "lm-eval is installed, lm-eval tasks. Prints a JSON report. Data "
        "options default to the run's own when --model is a training output directory.")
    p.add_argument("--model", required=True,
                   help="a training --output_dir (evaluates its hf/ export), a directory written "
                   "by launch/convert.py (hf or packed), or any Hugging Face model name or "
                   "directory")
    p.add_argument("--dataset", default=None,
                   help=f"dataset whose validation split is scored (default: the run's, else "
                   f"{training.dataset})")
    p.add_argument("--dataset_config", default=None, help="the dataset's configuration name")
    p.add_argument("--text_column", default=None, help="column holding the text")
    p.add_argument("--block_size", "--max_length", type=int, default=None,
                   help=f"tokens per row (default: the run's, else {training.block_size})")
    p.add_argument("--max_blocks", type=int, default=None,
                   help="score at most this many blocks (default: the run's --eval_max_blocks, "
                   "else all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the validation carve-out for datasets without a validation split "
                   f"(default: the run's, else {training.seed})")
    p.add_argument("--batch_size", type=int, default=8, help="blocks per forward (default: 8)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="dtype to run the model in (default: fp32)")
    p.add_argument("--device", default=None,
                   help="device to run the model on (default: cuda when a GPU is visible, else "
                   "cpu)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer that tokenizes the data and the tasks: a directory or a "
                   "Hugging Face id (default: the model's own)")
    p.add_argument("--no_perplexity", action="store_true", help="skip the perplexity")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, e.g. piqa,arc_easy,arc_challenge,"
                   "openbookqa,gsm8k (needs `pip install lm-eval` and its datasets)")
    p.add_argument("--include_path", default=None,
                   help="lm-eval: a directory of your own task YAMLs, found beside lm-eval's "
                   "(e.g. tests/evaluation/lm_eval_task, whose data path is relative to the "
                   "repository root: run from there)")
    p.add_argument("--limit", type=int, default=None,
                   help="lm-eval: examples per task (default: all)")
    p.add_argument("--num_fewshot", type=int, default=None,
                   help="lm-eval: few-shot examples (default: each task's own)")
    p.add_argument("--output", default=None, help="also write the JSON report to this file")
    return p


def data_options(args, run_config) -> dict:
    """Explicit options, else the run's, else training's defaults."""
    defaults = run_config or training_defaults()
    options = {}
    for ours, theirs in RUN_DEFAULTS.items():
        value = getattr(args, ours)
        if value is None and (run_config is not None or ours != "max_blocks"):
            value = getattr(defaults, theirs)
        options[ours] = value
    return options


def check_device(name: str) -> str:
    """`name` where it names the CPU or a present accelerator device; else one line, before any
    model loads (moving one to an absent device fails deep in torch)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from None
    if device.type == "cpu":
        return name
    present = torch.accelerator.current_accelerator() if torch.accelerator.is_available() \
        else None
    if present is None or present.type != device.type:
        raise UsageError(f"--device {name}: this machine has no {device.type} device (torch "
                         f"sees {present.type if present else 'no accelerator'}); use --device "
                         f"{present.type if present else 'cpu'}")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise UsageError(f"--device {name}: this machine has "
                         f"{torch.accelerator.device_count()} {device.type} device(s)")
    return name


def evaluate(args) -> dict:
    from tsld_ds.evaluation.harness import check_harness, run_tasks
    from tsld_ds.evaluation.models import load_eval_model
    from tsld_ds.evaluation.perplexity import model_perplexity, validation_blocks

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tokenizer is not None:
        check_model_source(args.tokenizer, "--tokenizer", marker="tokenizer_config.json")
    if args.tasks:
        check_harness()
    loaded = load_eval_model(args.model, DTYPES[args.dtype], device, tokenizer=args.tokenizer)
    report = {"model": args.model, "loaded_from": loaded.path, "kind": loaded.kind,
              "tokenizer": args.tokenizer, "dtype": args.dtype, "device": device}
    if loaded.run_config is not None:
        summary = Path(args.model) / "summary.json"
        if summary.is_file():
            report["training_ppl_after"] = json.loads(summary.read_text()).get("student_ppl_after")
    if not args.no_perplexity:
        options = data_options(args, loaded.run_config)
        blocks = validation_blocks(loaded.tokenizer, options["dataset"],
                                   dataset_config=options["dataset_config"],
                                   text_column=options["text_column"], seed=options["seed"],
                                   block_size=options["block_size"])
        value = model_perplexity(loaded.model, blocks, batch_size=args.batch_size,
                                 max_blocks=options["max_blocks"])
        scored = len(blocks) if options["max_blocks"] is None else min(len(blocks),
                                                                       options["max_blocks"])
        report["perplexity"] = {"value": value, "split": "validation", "blocks": scored,
                                **options}
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        report["tasks"] = run_tasks(loaded.model, loaded.tokenizer, tasks,
                                    batch_size=args.batch_size, limit=args.limit,
                                    num_fewshot=args.num_fewshot,
                                    include_path=args.include_path)
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("block_size", "max_blocks", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "block_size" else 1):
            build_parser().error(f"--{name} is too small: {value}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        build_parser().error(f"--include_path '{args.include_path}' is not a directory")

    def work() -> int:
        text = json.dumps(evaluate(args), indent=2, default=str)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return EXIT_COMPLETED

    return run_command(work)


def run() -> None:
    """Entry point of launch/eval.py and `tsld-eval`."""
    entry_point(main)
