"""Reproduce the paper's comparison and its ablations with launch/train.py, and write the results.

For a teacher and a dataset (default: the built-in tiny LLaMA and KJV corpus) it trains, one run
after another, the student with --kd gt, logit, logit_gt, l2l and tsld at 2 bits (TWN ternary
per channel) and at 4 bits (min-max per channel), plus TSLD ablations that each change one flag
(token scale uniform/inverse, temperature 1/5/20, per-tensor TWN, PACT+ learned scale, absmean
ternary), all with the same budget (steps, learning rate, seeds). The post-training-quantization
floor is the student's perplexity before QAT, which every run measures at step 0.

Each run lives in OUTPUT_ROOT/NAME/seed-SEED (train.log, metrics.jsonl, summary.json). A run whose
summary.json exists is skipped, so after an interruption the same command goes on where it
stopped. Then it writes DOCS_DIR/results.md (table, commands, machine, findings kept from the
previous page) and DOCS_DIR/img/*.png (validation perplexity against step per method; teacher
confidence histogram with the TSLD token scale it yields). The report covers every finished run
of the grid under OUTPUT_ROOT with the same options, so a later call with more --seeds for a
subset (--only main-w2) adds those seeds to the same table.

    python benchmarks/reproduce.py                          # the whole grid, one seed
    python benchmarks/reproduce.py --only main-w2 --seeds 43 44
    python benchmarks/reproduce.py --dry_run                # print the training commands

Needs matplotlib: pip install -e ".[results]". On a machine shared with other DeepSpeed jobs, a
private TORCH_EXTENSIONS_DIR keeps every run from waiting on their rebuilds of the JIT-built ops.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reproduce_grid import GRID, GROUPS, RunSpec, select_runs  # noqa: E402

TRAIN_SCRIPT = REPO / "launch" / "train.py"
# The default budget fits the 18-run grid in about an hour on 2 shared CPU cores, where a run
# spends ~2 minutes starting (launcher, DeepSpeed set-up, teacher and step-0 evaluations).
DEFAULT_STEPS = 60
DEFAULT_EVAL_BLOCKS = 128
RUN_RECORD = "reproduce.json"  # the training options a run directory was made with
TEMPERATURES = (1.0, 5.0, 10.0, 20.0)  # drawn in the token-scale figure


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # an unset option's help says what it falls back to
            if action.default in (None, []) or isinstance(action.default, bool):
                return action.help
            return super()._get_help_string(action)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    what = p.add_argument_group("what to train (passed to launch/train.py)")
    what.add_argument("--model", default=None,
                      help="student to quantize: a model directory or Hugging Face name; "
                      "default: launch/train.py's, the built-in tiny LLaMA")
    what.add_argument("--teacher", default=None,
                      help="full-precision teacher; default: --model, as in the paper")
    what.add_argument("--dataset", default=None,
                      help="training and validation text (see launch/train.py --help); "
                      "default: launch/train.py's, the built-in KJV corpus")
    what.add_argument("--dataset_config", default=None, help="the dataset's configuration name")
    what.add_argument("--text_column", default=None, help="the dataset's text column")
    what.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero3.json"),
                      help="DeepSpeed config of every run (micro-batch, precision, optimizer)")
    budget = p.add_argument_group("budget, the same for every run")
    budget.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="optimizer steps per run (the default fits the whole grid in about "
                        "an hour on 2 CPU cores)")
    budget.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, linear decay")
    budget.add_argument("--block_size", type=int, default=128, help="tokens per sequence")
    budget.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="seeds; each selected run is trained once per seed and the table "
                        "reports mean ± standard deviation")
    budget.add_argument("--eval_every", type=int, default=20,
                        help="validation perplexity every N steps (the curves' resolution)")
    budget.add_argument("--eval_max_blocks", type=int, default=DEFAULT_EVAL_BLOCKS,
                        help="validate on the first N blocks, the same for every run and the "
                        "teacher (0: all; the built-in corpus has 388 of 128 tokens)")
    runs = p.add_argument_group("which runs, where")
    runs.add_argument("--only", nargs="+", default=[], metavar="RUN",
                      help="train only these (default: all): group names ("
                      + ", ".join(GROUPS) + "), run "
                      "names or shell patterns (w2-tsld-*); runs: " +
                      ", ".join(r.name for r in GRID))
    runs.add_argument("--output_root", default="runs/reproduce", help="run directories")
    runs.add_argument("--docs_dir", default="docs", help="where results.md and img/ go")
    runs.add_argument("--num_gpus", type=int, default=2,
                      help="ranks per run (DeepSpeed launcher --num_gpus; CPU processes "
                      "without a GPU)")
    runs.add_argument("--confidence_blocks", type=int, default=None,
                      help="validation blocks for the teacher-confidence figure; default: those "
                      "of --eval_max_blocks (0: all)")
    runs.add_argument("--dry_run", action="store_true",
                      help="print each run's training command and exit")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be positive")
    try:
        args.selected = select_runs(args.only)
    except ValueError as e:
        p.error(str(e))
    return args


def run_dir(args, spec: RunSpec, seed: int) -> Path:
    return Path(args.output_root) / spec.name / f"seed-{seed}"


def train_options(args, spec: RunSpec, seed: int) -> list:
    """launch/train.py options of one run: the passthrough, the shared budget, the run's own."""
    passthrough = [("--model", args.model), ("--teacher", args.teacher),
                   ("--dataset", args.dataset), ("--dataset_config", args.dataset_config),
                   ("--text_column", args.text_column),
                   ("--eval_max_blocks", args.eval_max_blocks or None)]
    return ["--ds_config", args.ds_config,
            *[str(x) for option, value in passthrough if value is not None
              for x in (option, value)],
            "--block_size", str(args.block_size), "--lr", str(args.lr),
            "--max_steps", str(args.steps), "--eval_every", str(args.eval_every),
            "--seed", str(seed), *spec.options,
            "--no_export", "--output_dir", str(run_dir(args, spec, seed))]


def launcher_command(args, options: list) -> list:
    with socket.socket() as s:  # a free port: each run has its own rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_gpus),
            "--master_port", str(port), str(TRAIN_SCRIPT), *options]


def recorded_options(directory: Path):
    record = directory / RUN_RECORD
    return json.loads(record.read_text())["train_options"] if record.is_file() else None


def train_one(args, spec: RunSpec, seed: int, env: dict, prefix: str) -> str:
    """Trains one run unless it is finished; returns 'skipped', 'ran' or 'failed'."""
    directory = run_dir(args, spec, seed)
    options = train_options(args, spec, seed)
    if directory.exists():
        recorded = recorded_options(directory)
        if recorded != options:
            sys.exit(f"error: {directory} holds a run with other options than this call's "
                     f"({'none recorded' if recorded is None else shlex.join(recorded)}); choose "
                     "another --output_root or remove it")
        if (directory / "summary.json").is_file():
            return "skipped"
        shutil.rmtree(directory)  # an interrupted run of ours: start it again from scratch
    print(f"{prefix}: training ({time.strftime('%H:%M:%S')})", flush=True)
    directory.mkdir(parents=True)
    (directory / RUN_RECORD).write_text(json.dumps({"train_options": options}, indent=2))
    with open(directory / "train.log", "w") as log:
        subprocess.run(launcher_command(args, options), stdout=log, stderr=subprocess.STDOUT,
                       env=env)
    # The summary is written last: with it the run is complete, whatever the teardown returned.
    if not (directory / "summary.json").is_file():
        tail = (directory / "train.log").read_text().splitlines()[-15:]
        print("\n".join(["    " + line for line in tail]), flush=True)
        return "failed"
    return "ran"


def finished_results(args):
    """RunResults of every grid run under --output_root that finished with this call's options."""
    from reproduce_report import RunResults, read_seed_result

    results = []
    for spec in GRID:
        seeds = sorted(int(d.name.split("-", 1)[1])
                       for d in (Path(args.output_root) / spec.name).glob("seed-*"))
        done = [read_seed_result(run_dir(args, spec, s), s) for s in seeds
                if (run_dir(args, spec, s) / "summary.json").is_file()
                and recorded_options(run_dir(args, spec, s)) == train_options(args, spec, s)]
        if done:
            results.append(RunResults(spec, done))
    return results


def machine() -> str:
    import deepspeed
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} × {cpu}, {memory:.0f} GiB RAM, {gpu}; {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"deepspeed {deepspeed.__version__}")


def log_invocation(args, counts: dict, started: float, load_start: float) -> list:
    """Appends this call to OUTPUT_ROOT/invocations.jsonl if it trained anything (a call that
    only rewrites the report made no result); returns every call recorded there."""
    path = Path(args.output_root) / "invocations.jsonl"
    if counts["ran"]:
        record = {"date": now(), "command": "python " + shlex.join(sys.argv),
                  "elapsed_s": time.time() - started, "ran": counts["ran"],
                  "load_average": [load_start, os.getloadavg()[0]]}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def write_report(args, invocations: list) -> Path:
    from reproduce_plots import plot_confidence, plot_curves
    from reproduce_report import (confidence_lines, kept_findings, results_page,
                                  teacher_perplexity)
    from teacher_confidence import teacher_confidence
    from tsld_ds.data import BUILTIN_DATASET
    from tsld_ds.models import BUILTIN_MODEL

    results = finished_results(args)
    if not results:
        sys.exit(f"error: no finished run under {args.output_root} to report")
    teacher_ppl = teacher_perplexity(results)
    docs, img = Path(args.docs_dir), Path(args.docs_dir) / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots = {}
    reference = [r for r in results if r.spec.name == "w2-tsld"]
    for group in GROUPS:
        members = [r for r in results if r.spec.group == group]
        if group == "ablations" and members:
            members = reference + members  # each ablation against the run it changes
        if members:
            name = f"img/val_ppl_{group}.png"
            plot_curves(members, teacher_ppl, docs / name, f"Validation perplexity, {group}")
            plots[f"validation perplexity, {group}"] = name
    model, dataset = args.model or BUILTIN_MODEL, args.dataset or BUILTIN_DATASET
    blocks = args.eval_max_blocks if args.confidence_blocks is None else args.confidence_blocks
    stats = teacher_confidence(args.teacher or model, dataset, temperatures=TEMPERATURES,
                               dataset_config=args.dataset_config, text_column=args.text_column,
                               seed=args.seeds[0], block_size=args.block_size,
                               max_blocks=blocks or None)
    plot_confidence(stats, docs / "img/token_scale.png")
    plots["teacher confidence and TSLD scale"] = "img/token_scale.png"
    micro_batch = json.loads(Path(args.ds_config).read_text())["train_micro_batch_size_per_gpu"]
    seeds = sorted({s.seed for r in results for s in r.seeds})
    eval_blocks = f"the first {args.eval_max_blocks}" if args.eval_max_blocks else "all"
    setup = {
        "Student and teacher": f"`{model}` (student) taught by "
                               f"`{args.teacher or model}` (full precision, frozen)",
        "Dataset": f"`{dataset}`" + (f" ({args.dataset_config})" if args.dataset_config else ""),
        "Budget per run": f"{args.steps} steps, lr {args.lr:g} with linear decay, batch "
                          f"{micro_batch} × {args.num_gpus} ranks of {args.block_size} tokens, "
                          f"validation every {args.eval_every} steps on {eval_blocks} "
                          f"validation blocks; seeds "
                          f"{', '.join(map(str, seeds))}",
        "Machine": machine(),
        "Date": invocations[-1]["date"] if invocations else now(),
    }
    page = results_page(results=results, setup=setup, invocations=invocations, plots=plots,
                        confidence_lines=confidence_lines(stats),
                        findings=kept_findings(docs / "results.md"))
    (docs / "results.md").write_text(page)
    return docs / "results.md"


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = [(spec, seed) for seed in args.seeds for spec in args.selected]
    if args.dry_run:
        for spec, seed in plan:
            print(shlex.join(launcher_command(args, train_options(args, spec, seed))))
        return 0
    if importlib.util.find_spec("matplotlib") is None:  # before hours of training, not after
        sys.exit('error: benchmarks/reproduce.py draws its plots with matplotlib: '
                 'pip install -e ".[results]"')
    started, load_start = time.time(), os.getloadavg()[0]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # One compute thread per core: the ranks of a CPU run share the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_gpus)))
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    for i, (spec, seed) in enumerate(plan, 1):
        prefix = f"[{i}/{len(plan)}] {spec.name} seed {seed}"
        run_started = time.time()
        outcome = train_one(args, spec, seed, env, prefix)
        counts[outcome] += 1
        directory = run_dir(args, spec, seed)
        if outcome == "ran":
            summary = json.loads((directory / "summary.json").read_text())
            print(f"{prefix}: val PPL {summary['student_ppl_after']:.2f} (before "
                  f"{summary['student_ppl_before']:.2f}) in {time.time() - run_started:.0f} s",
                  flush=True)
        else:
            print(f"{prefix}: {outcome}" + (f", see {directory / 'train.log'}"
                                            if outcome == "failed" else " (finished before)"),
                  flush=True)
    invocations = log_invocation(args, counts, started, load_start)
    page = write_report(args, invocations)
    print(f"{counts['ran']} trained, {counts['skipped']} finished before, {counts['failed']} "
          f"failed in {time.time() - started:.0f} s; wrote {page}", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
