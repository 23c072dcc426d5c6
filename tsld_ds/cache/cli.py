"""`launch/teacher_cache.py` / `tsld-cache`: the teacher's outputs over a dataset's training rows,
computed once (`tsld_ds.cache.build`) for `launch/train.py --teacher_cache DIR`."""
import argparse
import dataclasses

from tsld_ds.cache.config import CacheConfig
from tsld_ds.errors import EXIT_COMPLETED
from tsld_ds.models import BUILTIN_MODEL
from tsld_ds.run.cli import entry_point, run_command
from tsld_ds.run.options import add_data_options, add_engine_options

DEFAULT_TAIL_SAMPLES = 32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tsld-cache",
        description="Run a frozen teacher once over a dataset's training rows and store its "
        "outputs for `launch/train.py --teacher_cache DIR`: per predicted position the "
        "log-probability of the label, and the full distribution (--topk 0) or the top-k "
        "log-probabilities with their token ids (and --tail_samples tokens drawn from the "
        "rest). Run it under the DeepSpeed launcher to shard the work: `deepspeed --num_gpus N "
        "launch/teacher_cache.py --output_dir DIR [options]`. "
        "Stopped, it resumes where it stopped when run again with the same options.")
    p.add_argument("--output_dir", required=True,
                   help="the cache directory (created; an unfinished cache of the same options "
                   "there is completed)")
    p.add_argument("--teacher", default=BUILTIN_MODEL,
                   help="the frozen teacher, a Hugging Face name or a local directory; training "
                   "must use the same one (its --teacher, or its --model when it has none) "
                   "(default: the built-in tiny LLaMA)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or directory; the rows must be training's (default: the "
                   "teacher's)")
    add_data_options(p, seed_help="training's --seed")
    cache = p.add_argument_group("cache")
    cache.add_argument("--topk", type=int, default=32,
                       help="store the K most likely tokens' log-probabilities and ids per "
                       "position; 0 stores the full distribution, exact but V values per token "
                       "(default: %(default)s)")
    cache.add_argument("--tail_samples", type=int, default=None,
                       help="beside the top k, store this many tokens drawn from the teacher's "
                       "distribution outside them, each weighted so that the cached target's "
                       "expectation is the full distribution (docs/method.md §2.5); 0 keeps the "
                       f"rest as one bucket (default: {DEFAULT_TAIL_SAMPLES}; 0 with --topk 0)")
    cache.add_argument("--rows_per_shard", type=int, default=None,
                       help="training rows per shard file; a rank holds one shard in memory "
                       "before writing it (default: about 256 MiB per shard)")
    add_engine_options(p, ds_help="DeepSpeed config whose precision and micro-batch the "
                       "teacher runs with, as in training")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> CacheConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.topk < 0:
        parser.error(f"--topk must be 0 (the full distribution) or more, got {args.topk}")
    if args.tail_samples is None:
        args.tail_samples = DEFAULT_TAIL_SAMPLES if args.topk else 0
    if args.tail_samples < 0:
        parser.error(f"--tail_samples must be 0 or more, got {args.tail_samples}")
    if args.tail_samples and args.topk == 0:
        parser.error("--tail_samples needs --topk K: --topk 0 stores the full distribution")
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        parser.error(f"--rows_per_shard must be positive, got {args.rows_per_shard}")
    if args.block_size < 2:
        parser.error("--block_size must be at least 2 (one input and one next token)")
    names = {f.name for f in dataclasses.fields(CacheConfig)}
    return CacheConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv=None) -> int:
    config = parse_args(argv)
    from tsld_ds.cache.build import build_cache  # heavy imports after --help and option errors

    def work() -> int:
        build_cache(config)
        return EXIT_COMPLETED

    return run_command(work, dist_timeout=config.dist_timeout)


def run() -> None:
    """Entry point of launch/teacher_cache.py and `tsld-cache`."""
    entry_point(main)
