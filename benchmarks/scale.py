"""tsld-estimate against measured memory: a LLaMA-7B-width slice trained on the CPU.

    python benchmarks/scale.py                      # 1 layer, block 2048, 1 and 2 ranks
    python benchmarks/scale.py --layers 2 --ranks 1

The slice is LLaMA-2-7B's config (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000,
larger than the built-in tokenizer's) with --layers blocks and random weights, saved once under
--output_root and reused. Student and teacher are the slice; the student is ternary (train.py's
defaults) with --gradient_checkpointing, ds_configs/zero3.json at micro-batch 1, fp32, the teacher
sharded by ZeRO-3 (ds_configs/teacher_zero3.json).

Each rank process's resident memory is sampled every 0.1 s; the figures are the peak from the
first training step to the last one (evaluation and the final save excluded), and the resident
memory held between steps (its least after the first step: model states, the teacher's shards,
the reduce bucket). The estimate is `tsld-estimate`'s for the same settings, its runtime term
(a CUDA context on a GPU) set to the peak of the same run with a model of almost no size
(hidden 8 x heads, one block: libraries, data, process group); the held estimate is its held
rows less fragmentation.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsld_ds.run.distributed import free_port  # noqa: E402

TRAIN = REPO / "launch" / "train.py"
SLICE_OF = REPO / "tsld_ds" / "assets" / "model_configs" / "llama-2-7b"
# The teacher sharded by ZeRO-3, as the estimate counts it (a run would replicate one that fits).
TEACHER_CONFIG = REPO / "ds_configs" / "teacher_zero3.json"
SHARDED_TEACHER = ("--teacher_ds_config", str(TEACHER_CONFIG))
MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1,
                   help="decoder blocks; 2 does not fit 2 ranks in 24 GB (default: 1)")
    p.add_argument("--hidden_size", type=int, default=4096)
    p.add_argument("--intermediate_size", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--output_root", default="runs/bench-scale")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2: the held memory is read between steps")
    return args


def make_slice(path: Path, *, layers, hidden_size, intermediate_size, heads, vocab_size) -> Path:
    """LLaMA-2-7B's config cut to `layers` blocks (and the given widths), random fp32 weights,
    with the built-in tokenizer; reused when its config matches."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tsld_ds.models import BUILTIN_MODEL, load_tokenizer
    config = AutoConfig.from_pretrained(SLICE_OF)
    config.update(dict(num_hidden_layers=layers, hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_attention_heads=heads,
                       num_key_value_heads=heads, head_dim=hidden_size // heads,
                       vocab_size=vocab_size, dtype="float32"))
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        if AutoConfig.from_pretrained(path).to_diff_dict() == config.to_diff_dict():
            return path
        shutil.rmtree(path)   # a slice of other sizes that this benchmark made
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp)
    load_tokenizer(BUILTIN_MODEL).save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    return path


def param_count(model_dir: Path) -> int:
    from safetensors import safe_open
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


class RankSampler(threading.Thread):
    """Samples the resident memory of every rank process under `root` (those with LOCAL_RANK)."""

    def __init__(self, root: psutil.Process, period: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.samples: list[tuple[float, int, int]] = []   # (time, local rank, rss)
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                procs = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now = time.time()
            for proc in procs:
                try:
                    rank = proc.environ().get("LOCAL_RANK")
                    if rank is not None and str(TRAIN) in " ".join(proc.cmdline()):
                        self.samples.append((now, int(rank), proc.memory_info().rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(self.period)


def write_ds_config(path: Path, params: int) -> Path:
    """zero3.json at micro-batch 1, its reduce bucket (DeepSpeed's default 5e8 elements) at most
    an eighth of the model: the CPU maps a buffer's pages only once they are written, a GPU
    holds all of it, so the bucket must fill for the CPU to show what a GPU would."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 1
    config["zero_optimization"]["reduce_bucket_size"] = min(int(5e8), params // 8)
    path.write_text(json.dumps(config, indent=1))
    return path


def measure(model_dir: Path, ds_config: Path, ranks: int, block_size: int, steps: int,
            output_dir: Path, extra_args: tuple = ()) -> dict:
    """Trains under the DeepSpeed launcher (launch/train.py's `extra_args` added); returns each
    rank's peak RSS over the training steps, its least RSS after the first step (what is held
    between steps) and every sample (kept in OUTPUT_DIR/memory.json: a finished measurement is
    reused)."""
    done = output_dir / "memory.json"
    settings = {"model": json.loads((model_dir / "config.json").read_text()),
                "ds_config": json.loads(ds_config.read_text()), "ranks": ranks,
                "block_size": block_size, "steps": steps}
    if extra_args:
        settings["extra_args"] = list(extra_args)
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(TRAIN), "--ds_config", str(ds_config),
           "--model", str(model_dir), "--block_size", str(block_size),
           "--gradient_checkpointing", "--max_steps", str(steps), "--log_every", "1",
           "--eval_max_blocks", "1", "--no_export", "--output_dir", str(output_dir),
           "--overwrite_output_dir", *extra_args]
    log = output_dir.with_suffix(".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        sampler = RankSampler(psutil.Process(proc.pid))
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    if code != 0:
        peaks = [max((rss for _, r, rss in sampler.samples if r == rank), default=0) / MiB
                 for rank in range(ranks)]
        raise SystemExit(f"training at {ranks} rank(s) failed (exit {code}; peak RSS per rank "
                         f"until then: {', '.join(f'{p:.0f} MiB' for p in peaks)}); see {log}")
    # The run's checkpoint is this measurement's scratch (12 bytes a parameter at 7B width), which
    # nobody resumes: gigabytes a run would fill the disk over a few calls.
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    step_ends = sorted(r["time"] for r in records if "loss" in r)   # after each optimizer step
    first = min(r["time"] for r in records if r["step"] == 0)       # the first step starts
    result = {"ranks": ranks, "wall_s": round(time.time() - start, 1), "settings": settings,
              "per_rank": []}
    for rank in range(ranks):
        mine = [(t, rss) for t, r, rss in sampler.samples if r == rank]
        result["per_rank"].append({
            "rank": rank,
            "peak_bytes": max(rss for t, rss in mine if first <= t <= step_ends[-1]),
            # between two steps: what the step holds throughout, before the next one's transients
            "held_bytes": min(rss for t, rss in mine if step_ends[0] <= t <= step_ends[-1]),
            "samples": mine})
    done.write_text(json.dumps(result))
    return result


def estimated(model_dir: Path, ds_config: Path, ranks: int, block_size: int,
              runtime_bytes: int) -> dict:
    import torch

    from tsld_ds.capacity.estimate import HELD, Setup, estimate, model_shape
    from tsld_ds.run.ds_config import read_ds_config, resolve_zero_sizes, teacher_ds_config
    config = resolve_zero_sizes(read_ds_config(str(ds_config), world=ranks), str(model_dir), ranks)
    shape = model_shape(str(model_dir), torch.float32, config["train_micro_batch_size_per_gpu"],
                        block_size, "sdpa")
    setup = Setup(num_gpus=ranks, num_nodes=1, block_size=block_size,
                  micro_batch=config["train_micro_batch_size_per_gpu"],
                  gradient_checkpointing=True, attn_implementation="sdpa",
                  runtime_bytes=runtime_bytes)
    teacher_config = resolve_zero_sizes(teacher_ds_config(
        config, json.loads(TEACHER_CONFIG.read_text())), str(model_dir), ranks)
    result = estimate(shape, shape, config, teacher_config, setup)
    held = sum(row.bytes for row in result.rows
               if row.phase == HELD and row.what != "allocator fragmentation")
    states = sum(row.bytes for row in result.rows
                 if row.what in ("student model states", "teacher parameters"))
    return {"total_bytes": result.total_bytes, "held_bytes": held, "states_bytes": states,
            "peak_phase": result.peak_phase, "params": shape.params,
            "rows": [(row.what, row.phase, row.bytes) for row in result.rows]}


def compare(args) -> dict:
    root = Path(args.output_root)
    root.mkdir(parents=True, exist_ok=True)
    slice_sizes = dict(vocab_size=args.vocab_size, heads=args.heads)
    model_dir = make_slice(root / f"slice-{args.layers}x{args.hidden_size}",
                           layers=args.layers, hidden_size=args.hidden_size,
                           intermediate_size=args.intermediate_size, **slice_sizes)
    ds_config = write_ds_config(root / f"ds_config-{model_dir.name}.json",
                                param_count(model_dir))
    # The same run with a model of almost no size: the runtime (libraries, data, process group).
    tiny_dir = make_slice(root / "slice-runtime", layers=1, hidden_size=8 * args.heads,
                          intermediate_size=16 * args.heads, **slice_sizes)
    tiny_config = write_ds_config(root / f"ds_config-{tiny_dir.name}.json",
                                  param_count(tiny_dir))
    figures = {"runs": []}
    for ranks in args.ranks:
        tiny = measure(tiny_dir, tiny_config, ranks, args.block_size, args.steps,
                       root / f"runtime-b{args.block_size}-r{ranks}", SHARDED_TEACHER)
        runtime = max(r["peak_bytes"] for r in tiny["per_rank"])
        run = measure(model_dir, ds_config, ranks, args.block_size, args.steps,
                      root / f"run-{args.layers}x{args.hidden_size}-b{args.block_size}-r{ranks}",
                      SHARDED_TEACHER)
        run["runtime_bytes"] = runtime
        run["estimate"] = estimated(model_dir, ds_config, ranks, args.block_size, runtime)
        figures["runs"].append(run)
        figures["params"] = run["estimate"]["params"]
    return figures


def format_table(figures: dict) -> str:
    lines = [f"{figures['params'] / 1e6:.0f}M parameters; each estimate's runtime term is the "
             "peak of the same run with a model of almost no size: " + ", ".join(
                 f"{run['runtime_bytes'] / MiB:.0f} MiB at {run['ranks']} rank(s)"
                 for run in figures["runs"]),
             f"{'ranks':>5} {'rank':>4} {'peak MiB':>9} {'estimate':>9} {'ratio':>6} "
             f"{'held MiB':>9} {'estimate':>9} {'ratio':>6} {'wall s':>7}"]
    for run in figures["runs"]:
        est = run["estimate"]
        for r in run["per_rank"]:
            lines.append(f"{run['ranks']:>5} {r['rank']:>4} {r['peak_bytes'] / MiB:>9.0f} "
                         f"{est['total_bytes'] / MiB:>9.0f} "
                         f"{r['peak_bytes'] / est['total_bytes']:>6.2f} "
                         f"{r['held_bytes'] / MiB:>9.0f} {est['held_bytes'] / MiB:>9.0f} "
                         f"{r['held_bytes'] / est['held_bytes']:>6.2f} {run['wall_s']:>7.0f}")
    lines.append("estimate (MiB; its peak phase):")
    for run in figures["runs"]:
        lines.append(f"  {run['ranks']} rank(s), {run['estimate']['peak_phase']}: " + ", ".join(
            f"{what} {size / MiB:.0f}" for what, _, size in run["estimate"]["rows"]))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    figures = compare(args)
    print(format_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
