"""Reproduce the paper's comparison and its ablations with launch/train.py, and write the results.

For a teacher and a dataset (default: the built-in tiny LLaMA and KJV corpus) it trains, one run
after another, the student with --kd gt, logit, logit_gt, l2l, tsld and tsld_nogt at 2 bits (TWN
ternary per channel) and at 4 bits (min-max per channel), plus TSLD ablations that each change
one flag (token scale uniform/inverse, temperature 1/5/20, per-tensor TWN, PACT+ learned scale,
absmean ternary), all with the same budget (steps, learning rate, seeds). The post-training-
quantization floor is the student's perplexity before QAT, which every run measures at step 0.

Two presets set the defaults of the regime they test (every option still overrides them):
  short  a short polish: 60 steps at lr 1e-4 on the whole dataset, the whole grid, one seed.
  long   the paper's regime: a small task (--train_tokens from the start of the training
         text, every 5th document held out for validation); the FP stage fine-tunes the teacher
         on it (--teacher_epochs, as the paper does on PTB) and the student starts from that
         teacher; QAT at 2 bits for --epochs (eval each epoch on validation and training
         blocks), gt, logit, logit_gt, tsld and tsld_nogt, 3 seeds, the teacher's outputs from
         an exact tsld-cache.
Each preset writes its own section of DOCS_DIR/results.md and keeps the other's.

Each run trains in OUTPUT_ROOT/NAME/seed-SEED (train.log, checkpoints, metrics.jsonl,
summary.json); the long preset's stages in OUTPUT_ROOT/task, teacher-fp and teacher-cache. A
finished run leaves its record in DOCS_DIR/runs/REGIME/NAME/seed-SEED (its options, the
teacher's SHA-256 with the long preset, summary.json and metrics.jsonl): what the report reads,
kept with the page so that the page can be rebuilt, and the grid finished, on another machine. A
recorded run is skipped, and one interrupted after a checkpoint resumes from it (the long runs
save one every 5 epochs), so after an interruption the same command goes on where it stopped;
Ctrl-C or SIGTERM stops the current run with a checkpoint and records the call. Then it writes its
section of DOCS_DIR/results.md (table, commands, machine; the other section and the findings kept
from the previous page) and DOCS_DIR/img/*.png (perplexity curves per method; teacher confidence
histograms with the TSLD token scale they yield). The report covers every recorded run of the grid
with the same options, so a later call with more --seeds for a subset (--only main-w2) adds those
seeds to the same table. The wall time of every call that trained is kept in
DOCS_DIR/runs/REGIME/invocations.jsonl.

    python benchmarks/reproduce.py                          # the short preset: the whole grid
    python benchmarks/reproduce.py --only main-w2 --seeds 43 44
    python benchmarks/reproduce.py --preset long            # the paper's regime (hours)
    python benchmarks/reproduce.py --dry_run                # print the training commands

Needs matplotlib: pip install -e ".[results]". On a machine shared with other DeepSpeed jobs, a
private TORCH_EXTENSIONS_DIR keeps every run from waiting on their rebuilds of the JIT-built ops.
"""
import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reproduce_grid import GRID, GROUPS, RunSpec, select_runs  # noqa: E402

TRAIN_SCRIPT = REPO / "launch" / "train.py"
CACHE_SCRIPT = REPO / "launch" / "teacher_cache.py"
DEFAULT_EVAL_BLOCKS = 128
# The short preset fits the 20-run grid in about an hour on 2 shared CPU cores, where a run spends
# ~2 minutes starting (launcher, DeepSpeed set-up, teacher and step-0 evaluations). The long one
# takes about 20 minutes a run: 30 epochs of Genesis (50k tokens), which the paper's 90 epochs of
# PTB's 1M tokens would make 60 hours.
PRESETS = {
    "short": dict(steps=60, lr=1e-4, seeds=[42], output_root="runs/reproduce", eval_every=20),
    "long": dict(train_tokens=50_000, teacher_epochs=3, teacher_lr=1e-4, epochs=30, lr=1e-4,
                 seeds=[42, 43, 44], output_root="runs/reproduce-long",
                 ds_config=str(REPO / "ds_configs" / "zero2.json"), eval_train_blocks=64,
                 only=["w2-gt", "w2-logit", "w2-logit_gt", "w2-tsld", "w2-tsld_nogt"]),
}
RUN_RECORD = "reproduce.json"  # the training options a run directory was made with
RECORDED = ("summary.json", "metrics.jsonl")  # what the report reads of a finished run
TEMPERATURES = (1.0, 5.0, 10.0, 20.0)  # drawn in the token-scale figure


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # an unset option's help says what it falls back to
            if action.default in (None, []) or isinstance(action.default, bool):
                return action.help
            return super()._get_help_string(action)

    preset = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    preset.add_argument("--preset", choices=tuple(PRESETS), default="short",
                        help="the regime whose defaults the other options take")
    chosen = preset.parse_known_args(argv)[0].preset
    # No abbreviations: which of --steps and --epochs was given is read from the words.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter,
                                parents=[preset], allow_abbrev=False)
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
    task = p.add_argument_group("the small task and its teacher (the long preset)")
    task.add_argument("--train_tokens", type=int, default=0,
                      help="a small task: documents from the start of the training text that "
                      "hold this many tokens, every 5th document between them held out for "
                      "validation; the teacher is first fine-tuned on it (0: the whole dataset, "
                      "the teacher as given)")
    task.add_argument("--teacher_epochs", type=float, default=3,
                      help="epochs of the FP stage's fine-tuning of the teacher on the task")
    task.add_argument("--teacher_lr", type=float, default=1e-4,
                      help="peak learning rate of the FP stage, linear decay")
    budget = p.add_argument_group("budget, the same for every run")
    budget.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run")
    budget.add_argument("--epochs", type=float, default=None,
                        help="passes over the training blocks per run, instead of --steps")
    budget.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, linear decay")
    budget.add_argument("--block_size", type=int, default=128, help="tokens per sequence")
    budget.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="seeds; each selected run is trained once per seed and the table "
                        "reports mean ± standard deviation")
    budget.add_argument("--eval_every", type=int, default=None,
                        help="validation perplexity every N steps, 0 only before and after "
                        "(the curves' resolution; unset: once an epoch, with --train_tokens)")
    budget.add_argument("--eval_train_blocks", type=int, default=0,
                        help="at each evaluation, also the perplexity on the first N training "
                        "blocks: the training curves")
    budget.add_argument("--eval_max_blocks", type=int, default=DEFAULT_EVAL_BLOCKS,
                        help="validate on the first N blocks, the same for every run and the "
                        "teacher (0: all; the built-in corpus has 388 of 128 tokens)")
    runs = p.add_argument_group("which runs, where")
    runs.add_argument("--only", nargs="+", default=[], metavar="RUN",
                      help="train only these (default: all): group names ("
                      + ", ".join(GROUPS) + "), run "
                      "names or shell patterns (w2-tsld-*); runs: " +
                      ", ".join(r.name for r in GRID))
    runs.add_argument("--output_root", help="run directories")
    runs.add_argument("--docs_dir", default="docs", help="where results.md and img/ go")
    runs.add_argument("--num_gpus", type=int, default=2,
                      help="ranks per run (DeepSpeed launcher --num_gpus; CPU processes "
                      "without a GPU)")
    runs.add_argument("--confidence_blocks", type=int, default=None,
                      help="blocks for the teacher-confidence figures; default: those of "
                      "--eval_max_blocks, and every block of each split with --train_tokens "
                      "(0: all)")
    runs.add_argument("--dry_run", action="store_true",
                      help="print each run's training command and exit")
    p.set_defaults(**PRESETS[chosen])
    args = p.parse_args(argv)
    given = {word.split("=")[0] for word in (sys.argv[1:] if argv is None else argv)}
    if {"--steps", "--epochs"} <= given:
        p.error("give the budget as --steps or as --epochs, not both")
    if args.steps is not None and args.epochs is not None:  # the preset's, and one given
        args.steps, args.epochs = (None, args.epochs) if "--epochs" in given else \
            (args.steps, None)
    if (args.steps is not None and args.steps < 1) or (args.epochs is not None
                                                       and args.epochs <= 0):
        p.error("the budget must be positive")
    if args.eval_every is None and not args.train_tokens:
        p.error("--eval_every: the whole dataset has no epoch length to default to")
    if args.eval_every is not None and args.eval_every < 0:
        p.error("--eval_every must be 0 or more")
    if args.train_tokens and args.teacher and args.model and args.teacher != args.model:
        p.error("--train_tokens: the student starts from the fine-tuned teacher, as in the "
                "paper; give --model or --teacher, not two models")
    try:
        args.selected = select_runs(args.only)
    except ValueError as e:
        p.error(str(e))
    return args


def run_dir(args, spec: RunSpec, seed: int) -> Path:
    return Path(args.output_root) / spec.name / f"seed-{seed}"


def task_paths(args) -> dict:
    """Where the long preset's stages put the task split, the fine-tuned teacher and its cache."""
    root = Path(args.output_root)
    return {"task": root / "task", "teacher": root / "teacher-fp", "cache": root / "teacher-cache"}


def budget_options(args) -> list:
    """The budget every QAT run shares: --max_steps or --epochs, evaluation, the schedule."""
    budget = ["--max_steps", str(args.steps)] if args.steps else ["--epochs", f"{args.epochs:g}"]
    eval_every = args.steps_per_epoch if args.eval_every is None else args.eval_every
    options = [*budget, "--lr", str(args.lr), "--eval_every", str(eval_every)]
    if args.eval_train_blocks:
        options += ["--eval_train_blocks", str(args.eval_train_blocks)]
    if args.train_tokens:  # long runs: an interrupted one resumes from its last 5 epochs
        options += ["--save_every", str(5 * args.steps_per_epoch), "--keep_checkpoints", "1"]
    return options


def portable(options: list) -> list:
    """`options` with this checkout's own path taken off the paths in it, so that a record made
    in one clone matches the same run in another."""
    prefix = str(REPO) + os.sep
    return [word[len(prefix):] if word.startswith(prefix) else word for word in options]


def same_options(recorded: list, options: list) -> bool:
    """Whether two launch/train.py option lists say the same, in whatever order."""
    def pairs(words):
        words = portable(words)
        return {word: words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--")
                else True for i, word in enumerate(words) if word.startswith("--")}

    return recorded is not None and pairs(recorded) == pairs(options)


def records_root(args) -> Path:
    return Path(args.docs_dir) / "runs" / ("long" if args.train_tokens else "short")


def record_dir(args, spec: RunSpec, seed: int) -> Path:
    return records_root(args) / spec.name / f"seed-{seed}"


def record_matches(args, spec: RunSpec, seed: int):
    """Whether the record of this run in DOCS_DIR/runs has this call's options and teacher; None
    where there is no record."""
    record = record_dir(args, spec, seed) / RUN_RECORD
    if not record.is_file():
        return None
    kept = json.loads(record.read_text())
    return same_options(kept["train_options"], train_options(args, spec, seed)) and \
        kept.get("teacher_sha256") == args.teacher_sha256


def is_recorded(args, spec: RunSpec, seed: int) -> bool:
    """Whether this run is recorded finished; exits if its record has other options or another
    teacher, which a new run must not silently replace."""
    matches = record_matches(args, spec, seed)
    if matches is False:
        sys.exit(f"error: {record_dir(args, spec, seed)} records a run with other options or "
                 "another teacher than this call's; choose another --docs_dir or remove it")
    return bool(matches)


def keep_record(args, spec: RunSpec, seed: int) -> None:
    """Copies a finished run's summary and metrics to DOCS_DIR/runs, with its identity."""
    directory, record = run_dir(args, spec, seed), record_dir(args, spec, seed)
    record.mkdir(parents=True, exist_ok=True)
    for name in RECORDED:
        shutil.copyfile(directory / name, record / name)
    # Written last: with it the record is complete.
    (record / RUN_RECORD).write_text(json.dumps(
        {"train_options": portable(train_options(args, spec, seed)),
         "teacher_sha256": args.teacher_sha256}, indent=2))


def train_options(args, spec: RunSpec, seed: int) -> list:
    """launch/train.py options of one run: the passthrough, the shared budget, the run's own."""
    passthrough = [("--model", args.model), ("--teacher", args.teacher),
                   ("--dataset", args.dataset), ("--dataset_config", args.dataset_config),
                   ("--text_column", args.text_column),
                   ("--eval_max_blocks", args.eval_max_blocks or None)]
    kd = spec.options[spec.options.index("--kd") + 1]
    if getattr(args, "teacher_cache", None) and kd not in ("gt", "l2l"):  # l2l: the layers
        passthrough.append(("--teacher_cache", args.teacher_cache))
    return ["--ds_config", args.ds_config,
            *[str(x) for option, value in passthrough if value is not None
              for x in (option, value)],
            "--block_size", str(args.block_size), *args.budget,
            "--seed", str(seed), *spec.options,
            "--no_export", "--output_dir", str(run_dir(args, spec, seed))]


def launcher_command(args, options: list, script: Path = TRAIN_SCRIPT) -> list:
    from tsld_ds.run.distributed import free_port  # each run has its own rendezvous

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_gpus),
            "--master_port", str(free_port()), str(script), *options]


class Stopped(Exception):
    """SIGINT or SIGTERM reached this script: stop the current run and record the call."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def run_stoppable(command: list, env: dict, **popen) -> int:
    """Runs a DeepSpeed launcher command in its own process group and returns its exit code. On
    Stopped, SIGTERM reaches the launcher and every rank at once (the ranks save a checkpoint
    after their current step); this waits until the whole group is gone, then re-raises."""
    process = subprocess.Popen(command, env=env, start_new_session=True, **popen)
    try:
        return process.wait()
    except Stopped:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + 120  # the launcher gives its ranks 30 s before it kills them
        while time.time() < deadline:
            process.poll()  # reaps the launcher: a zombie would count as left in the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        raise


def prepare_task(args, env: dict, dry_run: bool) -> list:
    """The long preset's stages before QAT, each done once: the task split, the FP stage (the
    teacher fine-tuned on it) and the teacher's exact cache. Points the runs' --model,
    --teacher, --dataset and --teacher_cache at them; returns the stages' commands."""
    from reproduce_task import write_task_split

    from tsld_ds.errors import UsageError
    from tsld_ds.models import BUILTIN_MODEL
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger: stdout is for commands
        from tsld_ds.run.ds_config import read_ds_config

    paths = task_paths(args)
    teacher = args.teacher or args.model or BUILTIN_MODEL
    request = dict(dataset=args.dataset or "builtin:kjv", dataset_config=args.dataset_config,
                   text_column=args.text_column, tokenizer=teacher,
                   train_tokens=args.train_tokens, block_size=args.block_size)
    if dry_run:  # the split's block count, without leaving it behind
        import tempfile
        with tempfile.TemporaryDirectory() as scratch:
            task = write_task_split(Path(scratch) / "task", **request)
    else:
        task = write_task_split(paths["task"], **request)
    try:
        config = read_ds_config(args.ds_config, world=args.num_gpus)
    except UsageError as e:
        sys.exit(f"error: {e}")
    blocks_per_step = config["train_micro_batch_size_per_gpu"] * args.num_gpus * \
        config.get("gradient_accumulation_steps", 1)
    args.task, args.steps_per_epoch = task, task["train_blocks"] // blocks_per_step  # as training
    fp_options = ["--ds_config", args.ds_config, "--model", teacher,
                  "--dataset", str(paths["task"]), "--block_size", str(args.block_size),
                  "--bits", "16", "--kd", "gt", "--epochs", f"{args.teacher_epochs:g}",
                  "--lr", str(args.teacher_lr), "--eval_every", str(args.steps_per_epoch),
                  "--eval_max_blocks", str(args.eval_max_blocks or task["validation_blocks"]),
                  "--eval_train_blocks", str(args.eval_train_blocks or task["train_blocks"]),
                  "--seed", "42", "--output_dir", str(paths["teacher"])]
    fine_tuned = str(paths["teacher"] / "hf")
    cache_options = ["--teacher", fine_tuned, "--dataset", str(paths["task"]),
                     "--block_size", str(args.block_size), "--topk", "0",
                     "--ds_config", args.ds_config, "--output_dir", str(paths["cache"])]
    commands = [launcher_command(args, fp_options), launcher_command(args, cache_options,
                                                                     CACHE_SCRIPT)]
    if not dry_run:
        if train_one(args, paths["teacher"], fp_options, env, "FP stage: teacher") == "failed":
            sys.exit(f"error: the FP stage failed; see {paths['teacher'] / 'train.log'}")
        from tsld_ds.models import model_identity
        from tsld_ds.teacher.cache import read_manifest
        manifest = read_manifest(paths["cache"]) or {}
        args.teacher_sha256 = model_identity(fine_tuned)  # records name the teacher they learnt
        if manifest.get("complete") and \
                manifest["identity"]["teacher_sha256"] != args.teacher_sha256:
            sys.exit(f"error: {paths['cache']} holds the outputs of another teacher than "
                     f"{fine_tuned}; remove it and rerun to build it for this one")
        if not manifest.get("complete"):
            print(f"teacher cache ({time.strftime('%H:%M:%S')})", flush=True)
            if run_stoppable(commands[1], env) != 0:
                sys.exit("error: tsld-cache failed (its output is above)")
    args.model = args.teacher = fine_tuned
    args.dataset, args.dataset_config, args.text_column = str(paths["task"]), None, None
    args.teacher_cache = str(paths["cache"])
    args.budget = budget_options(args)
    return commands


def recorded_options(directory: Path):
    record = directory / RUN_RECORD
    return json.loads(record.read_text())["train_options"] if record.is_file() else None


def train_one(args, directory: Path, options: list, env: dict, prefix: str) -> str:
    """Runs launch/train.py with `options` into `directory` unless that run is finished; an
    interrupted run resumes from its last checkpoint. Returns 'skipped', 'ran' or 'failed'."""
    resume = []
    if directory.exists():
        recorded = recorded_options(directory)
        if not same_options(recorded, options):
            sys.exit(f"error: {directory} holds a run with other options than this call's "
                     f"({'none recorded' if recorded is None else shlex.join(recorded)}); choose "
                     "another --output_root or remove it")
        if (directory / "summary.json").is_file():
            return "skipped"
        if (directory / "checkpoints" / "latest").is_file():
            resume = ["--resume", "latest"]
        else:  # an interrupted run of ours with nothing saved: start it again
            shutil.rmtree(directory)
    print(f"{prefix}: {'resuming' if resume else 'training'} ({time.strftime('%H:%M:%S')})",
          flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_RECORD).write_text(json.dumps({"train_options": options}, indent=2))
    with open(directory / "train.log", "a") as log:
        run_stoppable(launcher_command(args, options + resume), env, stdout=log,
                      stderr=subprocess.STDOUT)
    # The summary is written last: with it the run is complete, whatever the teardown returned.
    if not (directory / "summary.json").is_file():
        tail = (directory / "train.log").read_text().splitlines()[-15:]
        print("\n".join(["    " + line for line in tail]), flush=True)
        return "failed"
    return "ran"


def finished_results(args):
    """RunResults of every grid run recorded in DOCS_DIR/runs with this call's options."""
    from reproduce_report import RunResults, read_seed_result

    results = []
    for spec in GRID:
        seeds = sorted(int(d.name.split("-", 1)[1])
                       for d in (records_root(args) / spec.name).glob("seed-*"))
        done = [read_seed_result(record_dir(args, spec, s), s) for s in seeds
                if record_matches(args, spec, s)]
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


def log_invocation(args, counts: dict, started: float, load_start: float,
                   stopped: str = None) -> list:
    """Appends this call to DOCS_DIR/runs/REGIME/invocations.jsonl if it trained (a call that
    only rewrites the report made no result); returns every call recorded there."""
    path = records_root(args) / "invocations.jsonl"
    if counts["ran"] or stopped:
        record = {"date": now(), "command": "python " + shlex.join(sys.argv),
                  "elapsed_s": time.time() - started, "ran": counts["ran"],
                  "load_average": [load_start, os.getloadavg()[0]]}
        if stopped:
            record["note"] = f"stopped by {stopped}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def write_report(args, invocations: list) -> Path:
    """Rewrites this regime's section of DOCS_DIR/results.md (and its figures), keeping the
    other regime's section and the findings."""
    from reproduce_report import kept_findings, kept_section, results_page

    results = finished_results(args)
    if not results:
        sys.exit(f"error: no finished run under {args.output_root} to report")
    docs = Path(args.docs_dir)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    regime = "long" if args.train_tokens else "short"
    seeds = sorted({s.seed for r in results for s in r.seeds})
    micro_batch = json.loads(Path(args.ds_config).read_text())["train_micro_batch_size_per_gpu"]
    budget = (f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs") + \
        f", lr {args.lr:g} with linear decay, batch {micro_batch} × {args.num_gpus} ranks of " \
        f"{args.block_size} tokens; seeds {', '.join(map(str, seeds))}"
    common = {"Machine": machine(), "Date": invocations[-1]["date"] if invocations else now()}
    section = (_long_section if regime == "long" else _short_section)(args, results, docs,
                                                                      budget, common, invocations)
    sections = {other: kept for other in ("long", "short") if other != regime
                for kept in [kept_section(docs / "results.md", other)] if kept}
    page = results_page({**sections, regime: section}, kept_findings(docs / "results.md"))
    (docs / "results.md").write_text(page)
    return docs / "results.md"


def _confidence(args, dataset: str, split: str, blocks):
    from teacher_confidence import teacher_confidence

    from tsld_ds.models import BUILTIN_MODEL

    return teacher_confidence(args.teacher or args.model or BUILTIN_MODEL, dataset,
                              temperatures=TEMPERATURES, dataset_config=args.dataset_config,
                              text_column=args.text_column, seed=args.seeds[0],
                              block_size=args.block_size, max_blocks=blocks or None, split=split)


def _short_section(args, results, docs: Path, budget: str, common: dict, invocations) -> str:
    from reproduce_plots import plot_confidence, plot_curves
    from reproduce_report import confidence_lines, short_section, teacher_perplexity

    from tsld_ds.data import BUILTIN_DATASET
    from tsld_ds.models import BUILTIN_MODEL

    teacher_ppl = teacher_perplexity(results)
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
    stats = _confidence(args, dataset, "validation", blocks)
    plot_confidence(stats, docs / "img/token_scale.png")
    plots["teacher confidence and TSLD scale"] = "img/token_scale.png"
    eval_blocks = f"the first {args.eval_max_blocks}" if args.eval_max_blocks else "all"
    setup = {
        "Student and teacher": f"`{model}` (student) taught by "
                               f"`{args.teacher or model}` (full precision, frozen)",
        "Dataset": f"`{dataset}`" + (f" ({args.dataset_config})" if args.dataset_config else ""),
        "Budget per run": f"{budget}; validation every {args.eval_every} steps on {eval_blocks} "
                          "validation blocks",
        **common,
    }
    return short_section(results=results, setup=setup, invocations=invocations, plots=plots,
                         confidence_lines=confidence_lines(stats))


def _long_section(args, results, docs: Path, budget: str, common: dict, invocations) -> str:
    from reproduce_plots import plot_confidence, plot_train_and_validation
    from reproduce_report import TeacherStage, confidence_lines, long_section
    from reproduce_task import VALIDATION_EVERY

    paths, task = task_paths(args), args.task
    stage = TeacherStage.read(paths["teacher"])
    eval_every = int(args.budget[args.budget.index("--eval_every") + 1])
    plot_train_and_validation(results, (stage.val_after, stage.train_after),
                              args.steps_per_epoch, docs / "img/long_curves.png", "QAT")
    plots = {"validation and training perplexity": "img/long_curves.png"}
    lines = []
    for split, what in (("train", "training"), ("validation", "validation")):
        stats = _confidence(args, str(paths["task"]), split, args.confidence_blocks)
        name = f"img/long_token_scale_{split}.png"
        plot_confidence(stats, docs / name, what=what)
        plots[f"teacher confidence and TSLD scale, {what} tokens"] = name
        lines += confidence_lines(stats, what=what)
    request = task["request"]
    evaluated = min(args.eval_max_blocks or task["validation_blocks"], task["validation_blocks"])
    eval_blocks = "all" if evaluated == task["validation_blocks"] else f"the first {evaluated}"
    setup = {
        "Task": f"{task['train_documents']} documents from the start of "
                f"`{request['dataset']}`'s training text, {task['train_tokens']} tokens in "
                f"{task['train_blocks']} blocks; the {task['validation_documents']} documents "
                f"between them (every {VALIDATION_EVERY}th) held out for validation, "
                f"{task['validation_blocks']} blocks, {eval_blocks} evaluated",
        "FP stage": f"the teacher `{portable([request['tokenizer']])[0]}` fine-tuned on the task "
                    f"for {args.teacher_epochs:g} epochs at lr {args.teacher_lr:g} (GT only, full "
                    f"precision): validation PPL {stage.val_before:.2f} → {stage.val_after:.2f}; "
                    "the student starts from the fine-tuned teacher",
        "Budget per run": f"{budget}; {', '.join(sorted({r.spec.quantizer for r in results}))}; "
                          f"validation and training-block perplexity every {eval_every} steps "
                          f"({eval_every / args.steps_per_epoch:g} epoch(s); the first "
                          f"{args.eval_train_blocks} training blocks); the teacher's outputs "
                          "from an exact tsld-cache (--topk 0)",
        **common,
    }
    return long_section(results=results, stage=stage, steps_per_epoch=args.steps_per_epoch,
                        setup=setup,
                        invocations=invocations, plots=plots, confidence_lines=lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = [(spec, seed) for seed in args.seeds for spec in args.selected]
    if not args.dry_run and importlib.util.find_spec("matplotlib") is None:
        sys.exit('error: benchmarks/reproduce.py draws its plots with matplotlib: '
                 'pip install -e ".[results]"')  # before hours of training, not after
    started, load_start = time.time(), os.getloadavg()[0]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    args.teacher_sha256 = None  # the fine-tuned teacher's, once the long preset's FP stage is done
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    if not args.dry_run:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _raise_stopped)
    try:
        stages = []
        if args.train_tokens:
            stages = prepare_task(args, env, dry_run=args.dry_run)
        else:
            args.steps_per_epoch, args.teacher_cache = None, None
            args.budget = budget_options(args)
        if args.dry_run:
            for command in stages + [launcher_command(args, train_options(args, spec, seed))
                                     for spec, seed in plan]:
                print(shlex.join(command))
            return 0
        recorded = [is_recorded(args, spec, seed) for spec, seed in plan]  # all checked first
        for i, ((spec, seed), done) in enumerate(zip(plan, recorded), 1):
            prefix = f"[{i}/{len(plan)}] {spec.name} seed {seed}"
            if done:
                counts["skipped"] += 1
                print(f"{prefix}: skipped (recorded in {record_dir(args, spec, seed)})",
                      flush=True)
                continue
            run_started = time.time()
            directory = run_dir(args, spec, seed)
            outcome = train_one(args, directory, train_options(args, spec, seed), env, prefix)
            counts[outcome] += 1
            if outcome == "failed":
                print(f"{prefix}: failed, see {directory / 'train.log'}", flush=True)
                continue
            keep_record(args, spec, seed)
            summary = json.loads((directory / "summary.json").read_text())
            before = summary.get("student_ppl_before")
            print(f"{prefix}: val PPL {summary['student_ppl_after']:.2f} (before "
                  f"{'n/a' if before is None else f'{before:.2f}'})" +
                  (f" in {time.time() - run_started:.0f} s" if outcome == "ran" else
                   f", finished in {directory} before"), flush=True)
    except Stopped as stop:
        log_invocation(args, counts, started, load_start, stopped=str(stop))
        print(f"stopped by {stop} after {counts['ran']} run(s); the same command goes on where "
              "this one stopped", file=sys.stderr, flush=True)
        return 128 + signal.Signals[str(stop)].value
    finally:  # the report is written with the default handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    invocations = log_invocation(args, counts, started, load_start)
    page = write_report(args, invocations)
    print(f"{counts['ran']} trained, {counts['skipped']} finished before, {counts['failed']} "
          f"failed in {time.time() - started:.0f} s; wrote {page}", flush=True)
    return 1 if counts["failed"] else 0

if __name__ == "__main__":
    sys.exit(main())
