"""What tsld-ds's machinery costs: launch/train.py against a plain PyTorch loop doing the same
math.

    python benchmarks/step_overhead.py           # tokens/s: plain, tsld-ds at 1 and 2 ranks
    python benchmarks/step_overhead.py --memory  # peak memory per rank, 7B-width slice

The plain loop (written here, one process) loads the teacher and the student with transformers,
applies the same `quantize_model` surgery, reads the same blocks in the same order
(`ResumableDistributedSampler`), and trains with torch.optim.AdamW, the same schedule, gradient
clipping and tsld-ds's own fused loss (`Objective`), the teacher's final hidden states and lm_head
handed to it as launch/train.py does. tsld-ds is launch/train.py under the DeepSpeed launcher with
the given --ds_config, its steps timed by a `TrainHooks` object.

Both time each optimizer step and its phases (teacher forward; student forward + loss; backward;
optimizer step; the rest of the loop is "other"), the accelerator synchronized at each phase end.
The first --warmup steps are left out. With more than one rank, "plain xN" runs N plain loops side
by side, each with its share of the cores: what the machine gives N ranks with no communication at
all, the ceiling of tsld-ds's scaling. The variants run in interleaved rounds, each round one fresh
process per variant; the table gives the median over rounds of each variant's tokens/s and the
ratios, and the mean per-phase milliseconds.

--memory trains LLaMA-2-7B's width (--layers blocks, the built-in tokenizer's vocabulary) at block
512, micro-batch 1, with tsld-ds at 1 and 2 ranks (benchmarks/scale.py's slice and sampler: each
rank's resident memory every 0.1 s, peak over the training steps and memory held between steps).
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PHASES = ("teacher forward", "student forward + loss", "backward", "optimizer step")
MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", nargs="+", default=[str(REPO / "ds_configs" / "zero3.json")],
                   help="tsld-ds's DeepSpeed configs, each a variant; the first one's "
                   "micro-batch, optimizer settings and gradient clipping are the plain loop's "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: 40)")
    p.add_argument("--warmup", type=int, default=5,
                   help="first steps of each run left out of the timing (default: 5)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default: 8)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                   help="tsld-ds's rank counts (default: 1 2)")
    p.add_argument("--before", default=None, metavar="CHECKOUT",
                   help="another checkout of tsld-ds (say, an earlier commit's git worktree): "
                   "its launch/train.py at 1 rank joins every round as 'before'")
    p.add_argument("--memory", action="store_true",
                   help="measure peak memory per rank on the 7B-width slice instead")
    p.add_argument("--layers", type=int, default=1,
                   help="blocks of the 7B-width slice with --memory (default: 1): the model "
                   "states grow with them, what does not shard does not")
    p.add_argument("--block_size", type=int, default=None,
                   help="tokens per block (default: 128; 512 with --memory)")
    p.add_argument("--output_root", default="runs/bench-step-overhead")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    p.add_argument("--worker", choices=("plain", "tsld"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    args, train_argv = p.parse_known_args(argv)
    args.ds_config = [str(Path(c).resolve()) for c in args.ds_config]
    if args.worker is None and train_argv:
        p.error(f"unrecognized arguments: {' '.join(train_argv)}")
    if args.block_size is None:
        args.block_size = 512 if args.memory else 128
    # the options this script shares with launch/train.py go on to it
    args.train_argv = [*train_argv, "--ds_config", args.ds_config[0],
                       "--block_size", str(args.block_size)]
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if args.layers < 1:
        p.error(f"--layers must be at least 1, got {args.layers}")
    return args


class StepTimer:
    """Seconds per phase and per optimizer step; a step ends at `step_end()`."""

    def __init__(self):
        from deepspeed.accelerator import get_accelerator
        self.synchronize = get_accelerator().synchronize
        self.steps: list[dict] = []
        self._phases: dict = {}
        self._last_end = None

    @contextlib.contextmanager
    def phase(self, name: str):
        self.synchronize()
        start = time.perf_counter()
        yield
        self.synchronize()
        self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - start

    def step_end(self) -> None:
        self.synchronize()
        now = time.perf_counter()
        if self._last_end is not None:
            self.steps.append({"wall": now - self._last_end, **self._phases})
        self._phases, self._last_end = {}, now

    def write(self, path, tokens_per_step: int) -> None:
        Path(path).write_text(json.dumps({"tokens_per_step": tokens_per_step,
                                          "steps": self.steps}))


def timing_hooks(timer: StepTimer):
    """A TrainHooks that wraps the built run's teacher, forward, backward and step in phases."""
    from tsld_ds.train.hooks import TrainHooks

    class PhaseHooks(TrainHooks):
        def run_built(self, run):
            engine = run.engine
            forward, backward, step = engine.forward, engine.backward, engine.step

            def timed(name, fn):
                def wrapper(*a, **k):
                    with timer.phase(name):
                        return fn(*a, **k)
                return wrapper

            engine.forward = timed("student forward + loss", forward)
            engine.backward = timed("backward", backward)

            def step_and_end(*a, **k):
                with timer.phase("optimizer step"):
                    step(*a, **k)
                if engine.is_gradient_accumulation_boundary():
                    timer.step_end()
            # DeepSpeed moves to the next micro-step inside step(); ask before it does.
            engine.step = step_and_end
            if run.teacher is not None:
                outputs = run.teacher.outputs

                @contextlib.contextmanager
                def timed_outputs(*a, **k):
                    with contextlib.ExitStack() as stack:
                        with timer.phase("teacher forward"):
                            value = stack.enter_context(outputs(*a, **k))
                        yield value
                run.teacher.outputs = timed_outputs

    return PhaseHooks()


def tsld_worker(args) -> None:
    """launch/train.py's main() with the timing hooks; rank 0 writes the timings."""
    from tsld_ds.train.cli import main
    timer = StepTimer()
    code = main(args.train_argv, hooks=timing_hooks(timer))
    if code != 0:
        raise SystemExit(code)
    if os.environ.get("RANK", "0") == "0":
        micro = json.loads(Path(args.ds_config[0]).read_text())["train_micro_batch_size_per_gpu"]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        timer.write(args.result, micro * args.block_size * world)


def plain_worker(args) -> None:
    """The same run as a plain loop in one process (see the module's docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tsld_ds.data import EpochBatches, ResumableDistributedSampler, dataset_rows
    from tsld_ds.losses import TeacherOutput
    from tsld_ds.models import load_tokenizer, model_body
    from tsld_ds.quant import quantize_model
    from tsld_ds.run.distributed import seed_everything
    from tsld_ds.run.options import parse_args as train_args
    from tsld_ds.train.schedule import lr_lambda

    targs = train_args(args.train_argv)
    config = json.loads(Path(args.ds_config[0]).read_text())
    seed_everything(targs.seed)
    tokenizer = load_tokenizer(targs.model)
    train_rows, _ = dataset_rows(targs.dataset, tokenizer, targs.block_size, seed=targs.seed)
    teacher = AutoModelForCausalLM.from_pretrained(targs.teacher_name,
                                                   dtype=torch.float32)
    teacher.requires_grad_(False).eval()
    student = AutoModelForCausalLM.from_pretrained(targs.model, dtype=torch.float32)
    quantize_model(student, targs.quant_config)
    student.train()
    objective = targs.objective
    micro = config["train_micro_batch_size_per_gpu"]
    sampler = ResumableDistributedSampler(len(train_rows), num_replicas=1, rank=0,
                                          seed=targs.seed)
    batches = EpochBatches(train_rows, micro, sampler)
    opt_params = dict(config["optimizer"]["params"], lr=targs.lr)
    opt_params["betas"] = tuple(opt_params.get("betas", (0.9, 0.999)))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **opt_params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(targs.lr_schedule, targs.warmup_steps, targs.max_steps))
    clip = config.get("gradient_clipping", 0.0)
    seed_everything(targs.seed)
    head_t, head_s = teacher.get_output_embeddings(), student.get_output_embeddings()
    timer = StepTimer()
    timer.step_end()  # the first step starts here
    for _ in range(targs.max_steps):
        batch = next(batches)
        input_ids, labels = batch["input_ids"], batch["labels"]
        with timer.phase("teacher forward"), torch.no_grad():
            hidden_t = model_body(teacher)(input_ids=input_ids, use_cache=False).last_hidden_state
        with timer.phase("student forward + loss"):
            hidden_s = model_body(student)(input_ids=input_ids, use_cache=False).last_hidden_state
            losses = objective(hidden_s, head_s.weight, labels,
                               TeacherOutput(hidden=hidden_t, weight=head_t.weight,
                                             bias=head_t.bias),
                               lm_head_bias=head_s.bias)
        with timer.phase("backward"):
            losses["loss"].backward()
        with timer.phase("optimizer step"):
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        timer.step_end()
    timer.write(args.result, micro * targs.block_size)


def run_variant(args, variant: str, ranks: int, config: Path, out: Path, name: str,
                repo: Path = REPO) -> dict:
    """One fresh run of `variant` ('plain', or 'tsld': launch/train.py of the checkout `repo` with
    the DeepSpeed config `config`) and its timings."""
    result = out / f"{name}.json"
    run_dir = out / name
    if repo != REPO and config.is_relative_to(REPO):   # that checkout's own copy of the config
        config = repo / config.relative_to(REPO)
    train = ["--max_steps", str(args.steps), "--eval_max_blocks", "1", "--no_export",
             "--output_dir", str(run_dir), "--overwrite_output_dir"]
    me = [str(Path(__file__).resolve()), "--worker", variant, "--repo", str(repo),
          "--result", str(result), "--ds_config", str(config), "--block_size", str(args.block_size)]
    if variant == "plain" and ranks > 1:
        return plain_side_by_side(args, me, train, ranks, out, name, repo)
    if variant == "plain":
        cmd = [sys.executable, *me, *train]
    else:
        from scale import free_port
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), *me, *train]
    log = out / f"{name}.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{variant} at {ranks} rank(s) failed (exit {code}); see {log}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a timing's scratch, never resumed
    return summarize(args, json.loads(result.read_text()))


def plain_side_by_side(args, me, train, ranks, out, name, repo) -> dict:
    """`ranks` plain loops at once, each with its share of the cores (as tsld-ds's ranks get):
    what this machine's cores give without any communication. Its tokens/s is their sum."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    procs = []
    for i in range(ranks):
        cmd = [sys.executable, *me, *train]
        cmd[cmd.index("--result") + 1] = str(out / f"{name}-{i}.json")
        cmd[cmd.index("--output_dir") + 1] = str(out / f"{name}-{i}")
        log = open(out / f"{name}-{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=repo, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"plain loop {name} failed; see {log.name}")
        log.close()
    each = [summarize(args, json.loads((out / f"{name}-{i}.json").read_text()))
            for i in range(ranks)]
    return {"tokens_per_s": sum(e["tokens_per_s"] for e in each),
            "step_s": statistics.fmean(e["step_s"] for e in each),
            "phases": {p: statistics.fmean(e["phases"][p] for e in each)
                       for p in each[0]["phases"]}}


def summarize(args, timings: dict) -> dict:
    steps = timings["steps"][args.warmup - 1:]   # steps[0] is the second step
    wall = statistics.fmean(s["wall"] for s in steps)
    phases = {p: statistics.fmean(s.get(p, 0.0) for s in steps) for p in PHASES}
    phases["other"] = wall - sum(phases.values())
    return {"tokens_per_s": timings["tokens_per_step"] / wall, "step_s": wall, "phases": phases}


def throughput(args) -> dict:
    # (name, variant, ranks, DeepSpeed config, checkout)
    first = Path(args.ds_config[0])
    variants = [("plain", "plain", 1, first, REPO)]
    if max(args.ranks) > 1:   # the machine's ceiling: as many plain loops side by side
        variants.append((f"plain x{max(args.ranks)}", "plain", max(args.ranks), first, REPO))
    if args.before:
        variants.append(("before", "tsld", 1, first, Path(args.before).resolve()))
    for config in map(Path, args.ds_config):
        variants += [(f"{config.stem} r{r}", "tsld", r, config, REPO) for r in args.ranks]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as tmp:
        for i in range(args.rounds):
            row = {name: run_variant(args, variant, ranks, config, Path(tmp),
                                     name.replace(" ", "-"), repo)
                   for name, variant, ranks, config, repo in variants}
            rounds.append(row)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{name} {r['tokens_per_s']:.0f} tokens/s" for name, r in row.items()),
                flush=True)
    names = list(rounds[0])
    summary = {name: {"tokens_per_s": statistics.median(r[name]["tokens_per_s"] for r in rounds),
                      "phases_ms": {p: 1e3 * statistics.fmean(r[name]["phases"][p] for r in rounds)
                                    for p in (*PHASES, "other")}}
               for name in names}
    return {"rounds": rounds, "summary": summary, "steps": args.steps, "warmup": args.warmup,
            "block_size": args.block_size, "ds_configs": args.ds_config,
            "one_rank": f"{first.stem} r1"}


def format_throughput(figures: dict) -> str:
    summary = figures["summary"]
    plain = summary["plain"]["tokens_per_s"]
    one = summary.get(figures["one_rank"], {}).get("tokens_per_s")
    width = max(map(len, summary))
    lines = [f"{len(figures['rounds'])} rounds, {figures['steps']} steps each (first "
             f"{figures['warmup']} left out), block {figures['block_size']}; median tokens/s over "
             f"rounds, mean ms per step; 'x 1 rank' against {figures['one_rank']} (plain xN: N "
             "plain loops side by side, each with its share of the cores, against one)",
             f"{'variant':<{width}} {'tokens/s':>9} {'x plain':>8} {'x 1 rank':>9} " +
             " ".join(f"{p:>{max(len(p), 7)}}" for p in (*PHASES, "other"))]
    for name, s in summary.items():
        # plain xN: against one plain loop, the machine's ceiling for N ranks
        base = plain if name.startswith("plain x") else one if name != "plain" else None
        vs_one = f"{s['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(f"{name:<{width}} {s['tokens_per_s']:>9.0f} "
                     f"{s['tokens_per_s'] / plain:>8.2f} {vs_one:>9} " +
                     " ".join(f"{s['phases_ms'][p]:>{max(len(p), 7)}.1f}"
                              for p in (*PHASES, "other")))
    return "\n".join(lines)


def memory(args) -> dict:
    """Each rank's memory at 1 and 2 ranks with the teacher placed as the run chooses, and at 2
    ranks also sharded by ZeRO-3 (ds_configs/teacher_zero3.json; over one rank it is whole
    either way)."""
    from scale import make_slice, measure
    root = Path(args.output_root)
    model_dir = make_slice(root / f"slice-{args.layers}x4096-v4096", layers=args.layers,
                           hidden_size=4096,
                           intermediate_size=11008, heads=32, vocab_size=4096)
    config = json.loads(Path(args.ds_config[0]).read_text())
    config["train_micro_batch_size_per_gpu"] = 1
    ds_config = root / "ds_config-memory.json"
    ds_config.write_text(json.dumps(config, indent=1))
    sharded = ("--teacher_ds_config", str(REPO / "ds_configs" / "teacher_zero3.json"))
    runs = []
    for teacher, extra in (("as chosen", ()), ("ZeRO-3", sharded)):
        for ranks in [r for r in args.ranks if r > 1 or not extra]:
            run = measure(model_dir, ds_config, ranks, args.block_size, 3,
                          root / f"memory-l{args.layers}-b{args.block_size}-r{ranks}-"
                          f"{'chosen' if not extra else 'zero3'}", extra)
            runs.append({**run, "teacher": teacher})
    return {"runs": runs, "layers": args.layers, "block_size": args.block_size,
            "ds_config": args.ds_config[0]}


def format_memory(figures: dict) -> str:
    lines = [f"7B-width slice ({figures['layers']} block(s)), block {figures['block_size']}, "
             "micro-batch 1, "
             f"--gradient_checkpointing, {Path(figures['ds_config']).name}; MiB per rank",
             f"{'teacher':>9} {'ranks':>5} {'rank':>4} {'peak':>7} {'held':>7} "
             f"{'peak x 1 rank':>14}"]
    first = max(r["peak_bytes"] for r in figures["runs"][0]["per_rank"])
    for run in figures["runs"]:
        for r in run["per_rank"]:
            lines.append(f"{run['teacher']:>9} {run['ranks']:>5} {r['rank']:>4} "
                         f"{r['peak_bytes'] / MiB:>7.0f} {r['held_bytes'] / MiB:>7.0f} "
                         f"{r['peak_bytes'] / first:>14.2f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, args.repo)   # a worker of --before imports that checkout's tsld_ds
    if args.worker == "plain":
        return plain_worker(args)
    if args.worker == "tsld":
        return tsld_worker(args)
    Path(args.output_root).mkdir(parents=True, exist_ok=True)
    if args.memory:
        figures = memory(args)
        print(format_memory(figures))
    else:
        figures = throughput(args)
        print(format_throughput(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
