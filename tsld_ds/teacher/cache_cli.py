"""`launch/teacher_cache.py` / `tsld-cache`: the teacher runs once over a dataset's training rows,
sharded across ranks through the same DeepSpeed inference engine as training, and its outputs go
to a cache that `launch/train.py --teacher_cache DIR` trains from (`tsld_ds.teacher.cache`).

Every rank takes every world-th missing shard. A ZeRO-3 forward is a collective, so all ranks run
the same number of forwards per round: a rank with a short shard, or none, runs the round's
remaining forwards on a row it already has and drops their outputs. Shards are written whole, so
a build that stops (a signal, a crash, a time limit) resumes at the missing ones when run again
with the same options.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from tsld_ds.data import collate_blocks
from tsld_ds.devices import to_device
from tsld_ds.errors import EXIT_COMPLETED, EXIT_FAILED, EXIT_USAGE, RunFailed, UsageError
from tsld_ds.losses import default_chunk_size, next_token_targets, topk_with_sampled_tail
from tsld_ds.models import (check_block_size, check_model_source, load_causal_lm, load_tokenizer,
                            torch_dtype_of, vocab_size_of)
from tsld_ds.teacher.cache import (VALIDATION, CacheIdentity, read_manifest, shard_name,
                                   write_atomically, write_manifest, write_shard, written_shard)
from tsld_ds.teacher.engine import TeacherEngine, teacher_ds_config

DEFAULT_TAIL_SAMPLES = 32
SHARD_BYTES = 256 << 20  # a shard's target size: the rows a rank holds in memory before writing


def build_parser() -> argparse.ArgumentParser:
    from tsld_ds.models import BUILTIN_MODEL
    from tsld_ds.train.args import add_data_options

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
    p.add_argument("--attn_implementation", default=None,
                   choices=("eager", "sdpa", "flash_attention_2"),
                   help="the teacher's attention kernel (default: transformers' choice)")
    add_data_options(p)
    p.add_argument("--seed", type=int, default=42,
                   help="training's --seed (it picks the validation split of a dataset without "
                   "one) (default: %(default)s)")
    p.add_argument("--topk", type=int, default=32,
                   help="store the K most likely tokens' log-probabilities and ids per position; "
                   "0 stores the full distribution, exact but V values per token (default: "
                   "%(default)s)")
    p.add_argument("--tail_samples", type=int, default=None,
                   help="beside the top k, store this many tokens drawn from the teacher's "
                   "distribution outside them, each weighted so that the cached target's "
                   "expectation is the full distribution (docs/method.md §2.5); 0 keeps the "
                   f"rest as one bucket (default: {DEFAULT_TAIL_SAMPLES}; 0 with --topk 0)")
    p.add_argument("--rows_per_shard", type=int, default=None,
                   help="training rows per shard file; a rank "
                   "holds one shard in memory before writing it (default: about 256 MiB per "
                   "shard)")
    p.add_argument("--ds_config", default="ds_configs/zero3.json",
                   help="DeepSpeed config whose precision and micro-batch the teacher runs with, "
                   "as in training (default: %(default)s)")
    p.add_argument("--teacher_ds_config", default=None,
                   help="DeepSpeed config of the teacher's inference engine (default: derived "
                   "from --ds_config, as training derives it)")
    p.add_argument("--dist_timeout", type=float, default=1800,
                   help="seconds a collective may wait for the other ranks (default: "
                   "%(default)s)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
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
    return args


def build_cache(args) -> Path:
    """Builds (or completes) the cache and returns its directory."""
    from tsld_ds.train.build import (check_writable_dir, init_distributed,
                                     load_blocks, on_rank_zero, read_ds_config,
                                     resolve_zero_sizes, seed_everything)

    ds_config = read_ds_config(args.ds_config)
    check_model_source(args.teacher, "--teacher")
    teacher_config = read_ds_config(args.teacher_ds_config) if args.teacher_ds_config else None
    if args.tokenizer:
        check_model_source(args.tokenizer, "--tokenizer", marker="tokenizer_config.json")
    check_block_size(args.teacher, args.block_size, warn=os.environ.get("RANK", "0") == "0")
    check_writable_dir(args.output_dir)
    init_distributed(args.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(args.seed)
    out = Path(args.output_dir)

    tokenizer = load_tokenizer(args.tokenizer or args.teacher)
    train_rows, val_rows = load_blocks(args, tokenizer)
    train_rows, val_rows = train_rows.with_format("torch"), val_rows.with_format("torch")
    identity = on_rank_zero(lambda: CacheIdentity.of(args.teacher, tokenizer, args.dataset,
                                                     train_rows, args.block_size))
    config = resolve_zero_sizes(teacher_ds_config(ds_config, teacher_config), args.teacher,
                                world, "--teacher")
    dtype = str(torch_dtype_of(config)).removeprefix("torch.")
    existing = on_rank_zero(lambda: _check_existing(out, identity, args, dtype))

    model = load_causal_lm(args.teacher, config, attn_implementation=args.attn_implementation,
                           what="--teacher")
    vocab = vocab_size_of(model)
    if args.topk + args.tail_samples >= vocab:
        raise UsageError(f"--topk {args.topk} with --tail_samples {args.tail_samples} is not "
                         f"below the teacher's {vocab} tokens; pass --topk 0 for the full "
                         "distribution")
    teacher = TeacherEngine(model, config)
    micro = config["train_micro_batch_size_per_gpu"]
    row_bytes = args.block_size * (4 + (vocab * model.dtype.itemsize if args.topk == 0
                                        else (args.topk + args.tail_samples)
                                        * (4 + _ids_dtype(vocab).itemsize)))
    # A resumed build keeps the layout it started with.
    per_shard = (existing or {}).get("rows_per_shard") or args.rows_per_shard or \
        max(micro, SHARD_BYTES // row_bytes // micro * micro)
    contents = {"topk": args.topk, "tail_samples": args.tail_samples, "vocab_size": vocab,
                "dtype": dtype, "teacher_numel": teacher.partitioning()[0],
                "rows_per_shard": per_shard}
    shards = math.ceil(len(train_rows) / per_shard)

    def layout(i):  # shard i's first row and rows
        return i * per_shard, _shard_rows(i, per_shard, len(train_rows))

    def shards_to_compute():
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob("*.tmp"):  # a write cut short by the stop of an earlier build
            leftover.unlink()
        if existing is None:
            write_manifest(out, identity, contents, shards=[], complete=False)
        todo = [i for i in range(shards) if written_shard(out, i, *layout(i)) is None]
        print(f"{len(todo)} of {shards} shards of {per_shard} rows to compute", flush=True)
        return todo

    todo = on_rank_zero(shards_to_compute)

    started = time.time()
    progress = tqdm(total=len(train_rows), initial=len(train_rows) - sum(
        _shard_rows(i, per_shard, len(train_rows)) for i in todo), disable=rank != 0,
        desc="teacher cache", unit="row", dynamic_ncols=True)
    for round_start in range(0, len(todo), world):
        shards_now = todo[round_start:round_start + world]
        mine = shards_now[rank] if rank < len(shards_now) else None
        rows = [] if mine is None else list(range(
            mine * per_shard, mine * per_shard + _shard_rows(mine, per_shard, len(train_rows))))
        longest = max(_shard_rows(i, per_shard, len(train_rows)) for i in shards_now)
        outputs = []
        # The tail's draws depend on the shard alone, not on which rank or build computes it.
        draws = torch.Generator(teacher.engine.device)
        draws.manual_seed(args.seed * 1_000_003 + (mine or 0))
        for start in range(0, longest, micro):  # the same forwards on every rank
            batch_rows = rows[start:start + micro]
            batch = _batch(train_rows, batch_rows or [0], teacher)
            with teacher.outputs(batch["input_ids"]) as t:
                if batch_rows:
                    outputs.append(_cached_values(t, batch["labels"], args.topk,
                                                  args.tail_samples, draws))
            done = torch.tensor([len(batch_rows)], device=teacher.engine.device)
            dist.all_reduce(done)  # a progress bar of all ranks' rows
            progress.update(int(done.item()))
        failed = None
        if mine is not None:
            tensors = {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}
            try:
                write_shard(out, mine, rows[0], tensors)
            except OSError as e:
                failed = f"rank {rank} could not write {out / shard_name(mine)}: {e}"
        failures = [None] * world
        dist.all_gather_object(failures, failed)  # every rank stops alike
        if any(failures):
            raise RunFailed("; ".join(f for f in failures if f) + "; the shards written so "
                            "far are kept: run the same command again to go on")
    progress.close()

    nll, tokens = _validation_nll(teacher, val_rows, micro)

    def finish():
        from safetensors.torch import save

        entries = [written_shard(out, i, *layout(i)) for i in range(shards)]
        if None in entries:
            raise UsageError(f"rank 0 does not see shard {entries.index(None)} in {out}: "
                             "--output_dir must be on a filesystem every rank shares")
        write_atomically(out / VALIDATION, save({"nll": nll.cpu(), "tokens": tokens.cpu()}))
        write_manifest(out, identity, contents, shards=entries, complete=True)
        for i in range(shards):  # the manifest holds their entries now
            (out / f"shard-{i:05d}.json").unlink()
        return entries

    entries = on_rank_zero(finish)
    if rank == 0:
        size = sum(e["bytes"] for e in entries)
        tokens_cached = len(train_rows) * args.block_size
        print(f"teacher cache {out}: {len(train_rows)} rows of {args.block_size} tokens in "
              f"{shards} shards, {size / 2**20:.1f} MiB ({size / tokens_cached:.1f} bytes per "
              f"token; {_contents_text(args)}); "
              f"teacher validation perplexity {math.exp(nll.sum() / tokens.sum()):.3f}; "
              f"{time.time() - started:.0f} s", flush=True)
    dist.barrier()
    return out


def _check_existing(out: Path, identity: CacheIdentity, args, dtype: str) -> dict | None:
    """The manifest of an unfinished cache in `out`, which may be completed only if it was
    started with these options (None when there is none)."""
    manifest = read_manifest(out)
    if manifest is None:
        if out.is_dir() and any(out.glob("shard-*.safetensors")):
            raise UsageError(f"--output_dir {out} holds cache shards without a manifest; "
                             "choose another directory")
        return None
    differs = CacheIdentity(**manifest["identity"]).mismatch(identity)
    if differs is None and (manifest["topk"], manifest["tail_samples"], manifest["dtype"]) != (
            args.topk, args.tail_samples, dtype):
        differs = (f"--topk {manifest['topk']} --tail_samples {manifest['tail_samples']} in "
                   f"{manifest['dtype']}")
    if differs is None and args.rows_per_shard not in (None, manifest["rows_per_shard"]):
        differs = f"--rows_per_shard {manifest['rows_per_shard']}"
    if differs is not None:
        raise UsageError(f"--output_dir {out} holds a teacher cache built for {differs}; choose "
                         "another directory or delete that cache")
    if manifest["complete"]:
        raise UsageError(f"--output_dir {out} already holds this complete teacher cache; "
                         f"train with --teacher_cache {out}")
    return manifest


def _contents_text(args) -> str:
    if args.topk == 0:
        return "full distribution"
    return f"top {args.topk}" + (f" and {args.tail_samples} tail samples" if args.tail_samples
                                  else "")


def _shard_rows(shard: int, per_shard: int, total: int) -> int:
    return min(per_shard, total - shard * per_shard)


def _ids_dtype(vocab: int) -> torch.dtype:
    return torch.int16 if vocab <= 1 << 15 else torch.int32


def _batch(rows, indices: list, teacher: TeacherEngine) -> dict:
    """Rows `indices` of torch-formatted `rows` as a batch on the teacher's device."""
    return to_device(collate_blocks([rows[i] for i in indices]), teacher.engine.device)


@torch.no_grad()
def _cached_values(teacher, labels, topk: int, tail_samples: int, draws) -> dict:
    """What the cache stores for a micro-batch (host tensors), chunk by chunk over its tokens so
    that only [chunk, V] float32 logits exist at a time."""
    batch, length, hidden_size = teacher.hidden.shape
    hidden = teacher.hidden.reshape(batch * length, hidden_size)
    targets = next_token_targets(labels).flatten().clamp_min(0)
    chunk = default_chunk_size(teacher.weight.shape[0], hidden_size)
    parts = []
    for start in range(0, len(hidden), chunk):
        logits = F.linear(hidden[start:start + chunk], teacher.weight, teacher.bias)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        part = {"target_logprob": logprobs.gather(1, targets[start:start + chunk, None])[:, 0]}
        if topk == 0:
            part["logits"] = logits
        else:
            values, ids = topk_with_sampled_tail(logprobs, topk, tail_samples, draws)
            part["topk_logprobs"] = values
            part["topk_ids"] = ids.to(_ids_dtype(logits.shape[1]))
        parts.append(part)
    values = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return {name: v.reshape(batch, length, *v.shape[1:]).cpu() for name, v in values.items()}


@torch.no_grad()
def _validation_nll(teacher: TeacherEngine, val_rows, micro: int):
    """The teacher's summed next-token NLL and predicted tokens per validation row, gathered on
    every rank (each runs every world-th row; padding rows where a rank has none left)."""
    from tsld_ds.evaluation.perplexity import summed_nll

    rank, world = dist.get_rank(), dist.get_world_size()
    device = teacher.engine.device
    n = len(val_rows)
    per_rank = math.ceil(n / world)
    nll = torch.zeros(per_rank * world, dtype=torch.float64, device=device)
    tokens = torch.zeros(per_rank * world, dtype=torch.float64, device=device)
    mine = list(range(rank, per_rank * world, world))
    for start in range(0, per_rank, micro):
        idx = mine[start:start + micro]
        batch = _batch(val_rows, [i if i < n else 0 for i in idx], teacher)
        with teacher.outputs(batch["input_ids"]) as t:
            for j, i in enumerate(idx):
                if i < n:
                    row_nll, row_tokens = summed_nll(t.hidden[j:j + 1], t.weight, t.bias,
                                                     batch["labels"][j:j + 1])
                    nll[i], tokens[i] = row_nll.double(), row_tokens.double()
    dist.all_reduce(nll)
    dist.all_reduce(tokens)
    return nll[:n], tokens[:n]


def main(argv=None) -> int:
    args = parse_args(argv)
    owns_process_group = not dist.is_initialized()
    try:
        build_cache(args)
    except UsageError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_COMPLETED


def run() -> None:
    """Entry point of launch/teacher_cache.py and `tsld-cache` (exits at once, as tsld-train
    does, so no C++ thread outlives the process group)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
