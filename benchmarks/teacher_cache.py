"""The teacher cache against the teacher's engine on the built-in model and corpus.

    python benchmarks/teacher_cache.py  # every part, into runs/bench-teacher-cache
    python benchmarks/teacher_cache.py --parts speed size  # some of them

Parts (each prints its table; `--json` writes all figures):
  exact     --topk 0 against the engine, 2 ranks, 3 steps of plain SGD on the first 1500 verses:
            the largest relative difference of a step's loss and of the weights' change.
  speed     QAT tokens/s (the summary's, start-up and evaluation excluded) with the default cache
            (top 32 and 32 tail draws) and with the engine, at 1 and 2 ranks, in interleaved
            rounds; the ratio is the per-epoch
            speed-up (an epoch is the same tokens either way). The cache's build time is measured
            by building it; a 10-epoch run's wall time is then build + 10 epochs at the measured
            rates (an epoch of the built-in corpus is 1876 steps, too long to run ten times here).
  fidelity  the default QAT (300 steps, train.py's defaults) on the fly and from top-16, 64 and
            256 caches (the rest one bucket) and from top-32 and top-64 caches with as many
            tokens drawn from the rest (--tail_samples), seeds 1-3: validation perplexity after
            the run.
  size      bytes per cached token for each k, and each cache's size.

Caches are built with launch/teacher_cache.py at 2 ranks; a cache or run whose output exists is
reused, so the same command resumes. Wall times depend on the machine's load: run it alone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsld_ds.run.distributed import free_port  # noqa: E402

TRAIN = REPO / "launch" / "train.py"
CACHE = REPO / "launch" / "teacher_cache.py"
PARTS = ("exact", "speed", "fidelity", "size")
FIDELITY_CACHES = ((16, 0), (64, 0), (256, 0), (32, 32), (64, 64))  # (--topk, --tail_samples)
DEFAULT_CACHE = (32, 32)  # tsld-cache's defaults


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--output_root", default="runs/bench-teacher-cache")
    p.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds (default: 2)")
    p.add_argument("--speed_steps", type=int, default=60,
                   help="steps of each speed run (default: 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--json", default=None, help="also write every figure to this file")
    return p.parse_args(argv)


def launch(script: Path, args: list, ranks: int, log: Path) -> float:
    """Runs `script` under the DeepSpeed launcher with `ranks` processes; returns its wall time."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(script), *map(str, args)]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.time() - started


def build_cache(root: Path, topk: int, tail_samples: int = 0, dataset=None,
                extra=()) -> tuple[Path, float | None]:
    """(the cache directory, its build's wall time; None when it was already built)."""
    name = cache_name(topk, tail_samples) if dataset is None else f"exact-top{topk}"
    out = root / "caches" / name
    if (out / "manifest.json").is_file() and json.loads(
            (out / "manifest.json").read_text())["complete"]:
        return out, None
    args = ["--output_dir", out, "--topk", topk, "--tail_samples", tail_samples, *extra]
    if dataset is not None:
        args += ["--dataset", dataset]
    return out, launch(CACHE, args, 2, root / "logs" / f"cache-{name}.log")


def cache_name(topk: int, tail_samples: int) -> str:
    return f"top{topk}" + (f"-tail{tail_samples}" if tail_samples else "")


def train(root: Path, name: str, args: list, ranks: int) -> dict:
    out = root / "runs" / name
    if not (out / "summary.json").is_file():
        launch(TRAIN, ["--output_dir", out, "--overwrite_output_dir", *args], ranks,
               root / "logs" / f"{name}.log")
    return json.loads((out / "summary.json").read_text())


def exact_part(root: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from tsld_ds.data import builtin_corpus_dir
    from tsld_ds.models import BUILTIN_MODEL

    corpus = root / "corpus-1500"
    corpus.mkdir(parents=True, exist_ok=True)
    source = Path(builtin_corpus_dir())
    for split, lines in (("train", 1500), ("validation", 300)):
        text = (source / f"{split}.txt").read_text().splitlines()[:lines]
        (corpus / f"{split}.txt").write_text("\n".join(text) + "\n")
    sgd = root / "sgd.json"
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True,
                  optimizer={"type": "SGD", "params": {"lr": 0.1}})
    sgd.write_text(json.dumps(config))
    cache, _ = build_cache(root, 0, dataset=corpus, extra=["--ds_config", sgd])
    common = ["--dataset", corpus, "--ds_config", sgd, "--max_steps", 3, "--lr", 0.1,
              "--lr_schedule", "constant", "--log_every", 1, "--eval_every", 0,
              "--eval_max_blocks", 8, "--no_export"]
    runs = {}
    for name, extra in (("engine", []), ("cache", ["--teacher_cache", cache])):
        train(root, f"exact-{name}", common + extra, 2)
        out = root / "runs" / f"exact-{name}"
        losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl")
                                                     .read_text().splitlines()) if "loss" in r}
        runs[name] = losses, get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    start = {f"model.{k}": v.float() for k, v in
             load_file(Path(BUILTIN_MODEL) / "model.safetensors").items()}
    (engine_losses, engine_w), (cache_losses, cache_w) = runs["engine"], runs["cache"]
    loss_rel = max(abs(cache_losses[s] - v) / abs(v) for s, v in engine_losses.items())
    change_rel = max(((cache_w[k] - engine_w[k]).abs().max()
                      / (engine_w[k] - start[k]).abs().max().clamp_min(1e-30)).item()
                     for k in engine_w if k in start)
    figures = {"loss_rel_diff_max": loss_rel, "weight_change_rel_diff_max": change_rel,
               "cache_bytes_per_token": _bytes_per_token(cache)}
    print(f"exact (--topk 0 vs engine, 2 ranks, 3 SGD steps): largest relative loss difference "
          f"{loss_rel:.2e}; largest weight-change difference relative to the change "
          f"{change_rel:.2e}")
    return figures


def speed_part(root: Path, rounds: int, steps: int) -> dict:
    cache, build_s = build_cache(root, *DEFAULT_CACHE)
    name = cache_name(*DEFAULT_CACHE)
    common = ["--max_steps", steps, "--eval_every", 0, "--eval_max_blocks", 8, "--no_export",
              "--log_every", 10]
    rates = {}
    for r in range(rounds):
        for ranks in (1, 2):
            for source, extra in (("engine", []), ("cache", ["--teacher_cache", cache])):
                summary = train(root, f"speed-{name}-r{r}-{ranks}rank-{source}", common + extra,
                                ranks)
                rates.setdefault((ranks, source), []).append(summary["tokens_per_s"])
    manifest = json.loads((cache / "manifest.json").read_text())
    tokens = manifest["identity"]["rows"] * manifest["identity"]["block_size"]
    figures = {"cache_build_s_2_ranks": build_s, "epoch_tokens": tokens}
    print(f"speed ({rounds} interleaved rounds of {steps} steps; tokens/s, median):")
    print(f"| ranks | engine | cache {name} | ratio | epoch, engine | epoch, cache |")
    print("|---|---|---|---|---|---|")
    for ranks in (1, 2):
        engine = statistics.median(rates[(ranks, "engine")])
        cached = statistics.median(rates[(ranks, "cache")])
        figures[f"{ranks}_rank"] = {"engine_tokens_per_s": rates[(ranks, "engine")],
                                    "cache_tokens_per_s": rates[(ranks, "cache")],
                                    "ratio": cached / engine}
        print(f"| {ranks} | {engine:.0f} | {cached:.0f} | {cached / engine:.2f}x | "
              f"{tokens / engine / 60:.1f} min | {tokens / cached / 60:.1f} min |")
    if build_s is not None:
        engine = statistics.median(rates[(2, "engine")])
        cached = statistics.median(rates[(2, "cache")])
        ten_engine, ten_cache = 10 * tokens / engine, build_s + 10 * tokens / cached
        figures.update(ten_epochs_engine_s=ten_engine, ten_epochs_cache_s=ten_cache)
        print(f"10 epochs at 2 ranks: engine {ten_engine / 60:.0f} min; cache build "
              f"{build_s:.0f} s + 10 epochs = {ten_cache / 60:.0f} min "
              f"({ten_engine / ten_cache:.2f}x)")
    return figures


def fidelity_part(root: Path, seeds: list) -> dict:
    sources = {"engine": []}
    for k, tail in FIDELITY_CACHES:
        sources[cache_name(k, tail)] = ["--teacher_cache", build_cache(root, k, tail)[0]]
    ppl = {}
    for seed in seeds:
        for source, extra in sources.items():
            summary = train(root, f"fidelity-{source}-seed{seed}",
                            ["--seed", seed, "--eval_every", 0, "--no_export"] + extra, 1)
            ppl.setdefault(source, []).append(summary["student_ppl_after"])
    print(f"fidelity (default QAT, 300 steps, 1 rank; validation perplexity after, seeds {seeds}):")
    print("| teacher | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | mean - engine |")
    print("|---|" + "---|" * (len(seeds) + 2))
    base = statistics.mean(ppl["engine"])
    for source, values in ppl.items():
        mean = statistics.mean(values)
        print(f"| {source} | " + " | ".join(f"{v:.3f}" for v in values)
              + f" | {mean:.3f} | {mean - base:+.3f} |")
    return {"student_ppl_after": ppl, "seeds": seeds}


def size_part(root: Path) -> dict:
    figures = {}
    print("size: | cache | bytes per token | size |")
    for cache in sorted((root / "caches").glob("*")):
        manifest = json.loads((cache / "manifest.json").read_text())
        size = sum(s["bytes"] for s in manifest["shards"])
        figures[cache.name] = {"bytes": size, "bytes_per_token": _bytes_per_token(cache)}
        print(f"| {cache.name} | {_bytes_per_token(cache):.1f} | {size / 2**20:.1f} MiB |")
    return figures


def _bytes_per_token(cache: Path) -> float:
    manifest = json.loads((cache / "manifest.json").read_text())
    tokens = manifest["identity"]["rows"] * manifest["identity"]["block_size"]
    return sum(s["bytes"] for s in manifest["shards"]) / tokens


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.output_root)
    sys.path.insert(0, str(REPO))
    figures = {}
    for part in args.parts:
        if part == "exact":
            figures[part] = exact_part(root)
        elif part == "speed":
            figures[part] = speed_part(root, args.rounds, args.speed_steps)
        elif part == "fidelity":
            figures[part] = fidelity_part(root, args.seeds)
        else:
            figures[part] = size_part(root)
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
