"""The sharded build of a teacher cache (`tsld-cache`, `tsld_ds.cache.cli`): the teacher runs
once over a dataset's training rows through the same DeepSpeed inference engine as training, and
its outputs go to a cache that `launch/train.py --teacher_cache DIR` trains from
(`tsld_ds.teacher.cache`).

Every rank takes every world-th missing shard. A ZeRO-3 forward is a collective, so all ranks run
the same number of forwards per round: a rank with a short shard, or none, runs the round's
remaining forwards on a row it already has and drops their outputs. Shards are written whole, so
a build that stops (a signal, a crash, a time limit) resumes at the missing ones when run again
with the same options.
"""
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from tsld_ds.cache.config import CacheConfig
from tsld_ds.data import collate_blocks
from tsld_ds.devices import to_device
from tsld_ds.errors import RunFailed, UsageError
from tsld_ds.evaluation.perplexity import summed_nll
from tsld_ds.files import check_writable, write_atomically
from tsld_ds.losses import default_chunk_size, next_token_targets, topk_with_sampled_tail
from tsld_ds.models import (
    check_block_size,
    check_model_source,
    load_causal_lm,
    load_tokenizer,
    torch_dtype_of,
    vocab_size_of,
)
from tsld_ds.run.distributed import init_distributed, on_rank_zero, seed_everything
from tsld_ds.run.ds_config import read_ds_config, resolve_zero_sizes, teacher_ds_config
from tsld_ds.run.rows import check_dataset, load_rows
from tsld_ds.teacher.cache import (
    VALIDATION,
    CacheIdentity,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
    written_shard,
)
from tsld_ds.teacher.engine import TeacherEngine

SHARD_BYTES = 256 << 20  # a shard's target size: the rows a rank holds in memory before writing


@dataclass
class Layout:
    """How the cache's rows are cut into shards, and what each holds."""
    rows: int
    per_shard: int
    contents: dict   # the manifest's: topk, tail_samples, vocab_size, dtype, ...

    @property
    def shards(self) -> int:
        return math.ceil(self.rows / self.per_shard)

    def shard(self, i: int) -> tuple[int, int]:
        """Shard i's first row and its number of rows."""
        return i * self.per_shard, min(self.per_shard, self.rows - i * self.per_shard)


def build_cache(config: CacheConfig) -> Path:
    """Builds (or completes) the cache and returns its directory: the phases below in order."""
    ds_config, teacher_config = _checked_inputs(config)
    init_distributed(config.dist_timeout)
    seed_everything(config.seed)
    out = Path(config.output_dir)
    tokenizer = load_tokenizer(config.tokenizer or config.teacher)
    train_rows, val_rows = load_rows(config.dataset, tokenizer, config.block_size,
                                     dataset_config=config.dataset_config,
                                     text_column=config.text_column, seed=config.seed)
    train_rows, val_rows = train_rows.with_format("torch"), val_rows.with_format("torch")
    identity = on_rank_zero(lambda: CacheIdentity.of(config.teacher, tokenizer, config.dataset,
                                                     train_rows, config.block_size))
    engine_config = resolve_zero_sizes(teacher_ds_config(ds_config, teacher_config),
                                       config.teacher, dist.get_world_size(), "--teacher")
    dtype = str(torch_dtype_of(engine_config)).removeprefix("torch.")
    existing = on_rank_zero(lambda: _check_existing(out, identity, config, dtype))
    teacher, layout = _load_teacher(config, engine_config, existing, dtype, len(train_rows))
    todo = on_rank_zero(lambda: _shards_to_compute(out, identity, layout, existing is None))
    started = time.time()
    micro = engine_config["train_micro_batch_size_per_gpu"]
    _compute_shards(config, teacher, micro, train_rows, layout, todo, out)
    nll, tokens = _validation_nll(teacher, val_rows, micro)
    entries = on_rank_zero(lambda: _finish(out, identity, layout, nll, tokens))
    if dist.get_rank() == 0:
        size = sum(e["bytes"] for e in entries)
        tokens_cached = layout.rows * config.block_size
        print(f"teacher cache {out}: {layout.rows} rows of {config.block_size} tokens in "
              f"{layout.shards} shards, {size / 2**20:.1f} MiB ({size / tokens_cached:.1f} bytes "
              f"per token; {_contents_text(config)}); "
              f"teacher validation perplexity {math.exp(nll.sum() / tokens.sum()):.3f}; "
              f"{time.time() - started:.0f} s", flush=True)
    dist.barrier()
    return out


def _checked_inputs(config: CacheConfig) -> tuple[dict, dict | None]:
    """What can be checked before processes talk to each other: the DeepSpeed configs, the
    dataset's files, the teacher and tokenizer paths, the block size, the output directory."""
    ds_config = read_ds_config(config.ds_config)
    check_dataset(config.dataset)
    check_model_source(config.teacher, "--teacher")
    teacher_config = read_ds_config(config.teacher_ds_config) if config.teacher_ds_config \
        else None
    if config.tokenizer:
        check_model_source(config.tokenizer, "--tokenizer", marker="tokenizer_config.json")
    check_block_size(config.teacher, config.block_size,
                     warn=os.environ.get("RANK", "0") == "0")
    check_writable(config.output_dir, "--output_dir")
    return ds_config, teacher_config


def _load_teacher(config: CacheConfig, engine_config: dict, existing: dict | None, dtype: str,
                  rows: int) -> tuple[TeacherEngine, Layout]:
    """The teacher's engine, and the cache's layout: a resumed build keeps the one it started
    with; a new one cuts shards of about SHARD_BYTES."""
    model = load_causal_lm(config.teacher, engine_config,
                           attn_implementation=config.attn_implementation, what="--teacher")
    vocab = vocab_size_of(model)
    if config.topk + config.tail_samples >= vocab:
        raise UsageError(f"--topk {config.topk} with --tail_samples {config.tail_samples} is "
                         f"not below the teacher's {vocab} tokens; pass --topk 0 for the full "
                         "distribution")
    teacher = TeacherEngine(model, engine_config)
    micro = engine_config["train_micro_batch_size_per_gpu"]
    row_bytes = config.block_size * (4 + (vocab * model.dtype.itemsize if config.topk == 0
                                          else (config.topk + config.tail_samples)
                                          * (4 + _ids_dtype(vocab).itemsize)))
    per_shard = (existing or {}).get("rows_per_shard") or config.rows_per_shard or \
        max(micro, SHARD_BYTES // row_bytes // micro * micro)
    contents = {"topk": config.topk, "tail_samples": config.tail_samples, "vocab_size": vocab,
                "dtype": dtype, "teacher_numel": teacher.partitioning()[0],
                "rows_per_shard": per_shard}
    return teacher, Layout(rows=rows, per_shard=per_shard, contents=contents)


def _shards_to_compute(out: Path, identity: CacheIdentity, layout: Layout, new: bool) -> list:
    """Rank 0: the shards not yet written (whole), with an incomplete manifest in place."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob("*.tmp"):  # a write cut short by the stop of an earlier build
        leftover.unlink()
    if new:
        write_manifest(out, identity, layout.contents, shards=[], complete=False)
    todo = [i for i in range(layout.shards) if written_shard(out, i, *layout.shard(i)) is None]
    print(f"{len(todo)} of {layout.shards} shards of {layout.per_shard} rows to compute",
          flush=True)
    return todo


def _compute_shards(config: CacheConfig, teacher: TeacherEngine, micro: int, train_rows,
                    layout: Layout, todo: list, out: Path) -> None:
    """Every rank computes and writes every world-th shard of `todo`, round by round, `micro`
    rows per forward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = tqdm(total=layout.rows, initial=layout.rows - sum(layout.shard(i)[1]
                                                                  for i in todo),
                    disable=rank != 0, desc="teacher cache", unit="row", dynamic_ncols=True)
    for round_start in range(0, len(todo), world):
        shards_now = todo[round_start:round_start + world]
        mine = shards_now[rank] if rank < len(shards_now) else None
        first, count = layout.shard(mine) if mine is not None else (0, 0)
        rows = list(range(first, first + count))
        longest = max(layout.shard(i)[1] for i in shards_now)
        outputs = []
        # The tail's draws depend on the shard alone, not on which rank or build computes it.
        draws = torch.Generator(teacher.engine.device)
        draws.manual_seed(config.seed * 1_000_003 + (mine or 0))
        for start in range(0, longest, micro):  # the same forwards on every rank
            batch_rows = rows[start:start + micro]
            batch = _batch(train_rows, batch_rows or [0], teacher)
            with teacher.outputs(batch["input_ids"]) as t:
                if batch_rows:
                    outputs.append(_cached_values(t, batch["labels"], config.topk,
                                                  config.tail_samples, draws))
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


def _finish(out: Path, identity: CacheIdentity, layout: Layout, nll, tokens) -> list:
    """Rank 0: the validation file, then the complete manifest (what makes the cache usable)."""
    from safetensors.torch import save

    entries = [written_shard(out, i, *layout.shard(i)) for i in range(layout.shards)]
    if None in entries:
        raise UsageError(f"rank 0 does not see shard {entries.index(None)} in {out}: "
                         "--output_dir must be on a filesystem every rank shares")
    write_atomically(out / VALIDATION, save({"nll": nll.cpu(), "tokens": tokens.cpu()}))
    write_manifest(out, identity, layout.contents, shards=entries, complete=True)
    for i in range(layout.shards):  # the manifest holds their entries now
        (out / f"shard-{i:05d}.json").unlink()
    return entries


def _check_existing(out: Path, identity: CacheIdentity, config: CacheConfig,
                    dtype: str) -> dict | None:
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
            config.topk, config.tail_samples, dtype):
        differs = (f"--topk {manifest['topk']} --tail_samples {manifest['tail_samples']} in "
                   f"{manifest['dtype']}")
    if differs is None and config.rows_per_shard not in (None, manifest["rows_per_shard"]):
        differs = f"--rows_per_shard {manifest['rows_per_shard']}"
    if differs is not None:
        raise UsageError(f"--output_dir {out} holds a teacher cache built for {differs}; choose "
                         "another directory or delete that cache")
    if manifest["complete"]:
        raise UsageError(f"--output_dir {out} already holds this complete teacher cache; "
                         f"train with --teacher_cache {out}")
    return manifest


def _contents_text(config: CacheConfig) -> str:
    if config.topk == 0:
        return "full distribution"
    return f"top {config.topk}" + (f" and {config.tail_samples} tail samples" if config.tail_samples
                                  else "")


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
