"""The teacher's outputs computed once (docs/method.md §2.5): `tsld-cache` writes a cache, and
`launch/train.py --teacher_cache DIR` trains from it instead of running a teacher engine.

A cache directory holds, for every training row of one dataset at one block size:

    manifest.json             the identity it was built for (`CacheIdentity`), its shards with
                              their sizes and SHA-256, the teacher's validation NLL file
    shard-00000.safetensors   rows [first, first + n): `target_logprob` [n, L] float32, log p^T
                              of each position's next-token label; and `logits` [n, L, V] in the
                              teacher's dtype (--topk 0, exact) or `topk_logprobs` [n, L, K]
                              float32 with `topk_ids` [n, L, K] (int16 when V fits, else int32),
                              K = --topk plus --tail_samples tokens drawn from the rest
    validation.safetensors    the teacher's summed NLL and predicted tokens per validation row

Shards are written whole (a temporary name, then a rename), so a present shard is complete and an
interrupted build resumes at the first missing one. Readers map them (safetensors reads only the
rows asked for).
"""
import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

import tsld_ds
from tsld_ds.devices import to_device
from tsld_ds.errors import UsageError
from tsld_ds.files import sha256_file, write_atomically
from tsld_ds.losses import TeacherOutput, TopKTeacher
from tsld_ds.models import model_identity

MANIFEST = "manifest.json"
VALIDATION = "validation.safetensors"


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache's values depend on; a run may use a cache only if all of it matches."""

    teacher: str            # as given (a name or a path)
    teacher_sha256: str     # its config and weight files' contents (`model_identity`)
    tokenizer_sha256: str   # over its vocabulary and special tokens
    dataset: str            # as given
    rows_sha256: str        # over the training rows' token ids and labels
    rows: int
    block_size: int

    @classmethod
    def of(cls, teacher: str, tokenizer, dataset: str, rows, block_size: int) -> "CacheIdentity":
        """The identity of a run's teacher and rows (hashing the teacher's weight files)."""
        return cls(teacher=teacher, teacher_sha256=model_identity(teacher),
                   tokenizer_sha256=tokenizer_sha256(tokenizer), dataset=dataset,
                   rows_sha256=rows_sha256(rows), rows=len(rows), block_size=block_size)

    def mismatch(self, run: "CacheIdentity") -> str | None:
        """What differs between this cache's identity and a run's, as the user would fix it (the
        two sides where they differ as given, the contents where only they do)."""
        if self.block_size != run.block_size:
            return f"--block_size {self.block_size}, this run {run.block_size}"
        if self.tokenizer_sha256 != run.tokenizer_sha256:
            return "another tokenizer"
        if self.rows_sha256 != run.rows_sha256:
            if (self.dataset, self.rows) != (run.dataset, run.rows):
                return (f"other training rows (dataset {self.dataset}, {self.rows} rows; this "
                        f"run: {run.dataset}, {run.rows} rows)")
            return (f"other training rows: {self.rows} rows of {self.dataset} as this run's, "
                    "with other tokens (the data changed since, or another --seed split it)")
        if self.teacher_sha256 != run.teacher_sha256:
            if self.teacher != run.teacher:
                return f"another teacher ({self.teacher}; this run's is {run.teacher})"
            return f"another teacher: {self.teacher} holds other weights than it did then"
        return None


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 over a tokenizer's vocabulary (token -> id) and special tokens."""
    content = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": sorted(tokenizer.special_tokens_map.items(), key=str)}
    return hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()


def rows_sha256(rows) -> str:
    """SHA-256 over the rows' token ids (and labels where the rows have their own), in order."""
    digest = hashlib.sha256()
    columns = [c for c in ("input_ids", "labels") if c in rows.column_names]
    for batch in rows.with_format("numpy", columns=columns).iter(batch_size=4096):
        for column in columns:
            digest.update(np.ascontiguousarray(batch[column], dtype=np.int64).tobytes())
    return digest.hexdigest()


def read_manifest(cache_dir) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        CacheIdentity(**manifest["identity"])
        for key in ("topk", "tail_samples", "vocab_size", "dtype", "teacher_numel",
                    "rows_per_shard", "shards", "complete"):
            manifest[key]
        return manifest
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a tsld-ds teacher cache manifest: {e}") from None


def write_manifest(cache_dir, identity: CacheIdentity, contents: dict, *, shards: list,
                   complete: bool) -> None:
    """manifest.json, replaced whole (a reader never sees half of one). `contents`: what the
    values are (topk: 0 for the full distribution, tail_samples, vocab_size, dtype: the
    teacher's compute dtype, teacher_numel) and how they are laid out (rows_per_shard)."""
    manifest = {"identity": asdict(identity), **contents, "tsld_ds_version": tsld_ds.__version__,
                "complete": complete, "shards": shards,
                "validation": VALIDATION if complete else None}
    write_atomically(Path(cache_dir) / MANIFEST, json.dumps(manifest, indent=2).encode())


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(cache_dir, index: int, first: int, tensors: dict) -> dict:
    """Writes shard `index` (rows from `first`) and returns its manifest entry; the entry is also
    left beside it (shard-NNNNN.json, written before the shard) until the manifest takes it."""
    data = save({k: v.contiguous() for k, v in tensors.items()})
    rows = len(next(iter(tensors.values())))
    entry = {"file": shard_name(index), "first": first, "rows": rows, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
    cache_dir = Path(cache_dir)
    write_atomically(cache_dir / f"shard-{index:05d}.json", json.dumps(entry).encode())
    write_atomically(cache_dir / entry["file"], data)
    return entry


def written_shard(cache_dir, index: int, first: int, rows: int) -> dict | None:
    """Shard `index`'s entry if the shard is on disk whole and holds rows [first, first + rows),
    else None."""
    cache_dir = Path(cache_dir)
    entry_path = cache_dir / f"shard-{index:05d}.json"
    if not (entry_path.is_file() and (cache_dir / shard_name(index)).is_file()):
        return None
    entry = json.loads(entry_path.read_text())
    whole = (cache_dir / entry["file"]).stat().st_size == entry["bytes"]
    return entry if whole and (entry["first"], entry["rows"]) == (first, rows) else None


class TeacherCache:
    """A complete cache, opened for a run: `outputs()` hands the loss the teacher's side of a
    micro-batch by its rows' indices, as `TeacherEngine.outputs` computes it."""

    def __init__(self, cache_dir, manifest: dict):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.identity = CacheIdentity(**manifest["identity"])
        self.topk, self.vocab_size = manifest["topk"], manifest["vocab_size"]
        self.tail_samples = manifest["tail_samples"]
        self.shards = manifest["shards"]
        self.firsts = np.array([s["first"] for s in self.shards])
        self._open = {}

    @classmethod
    def open(cls, cache_dir, run: CacheIdentity) -> "TeacherCache":
        """The cache at `cache_dir` if it is complete and built for `run`; else UsageError."""
        manifest = read_manifest(cache_dir)
        if manifest is None or not manifest.get("complete"):
            raise UsageError(f"--teacher_cache {cache_dir} holds no complete teacher cache; "
                             "build it (or finish building it) with tsld-cache")
        cache = cls(cache_dir, manifest)
        covered = 0
        for entry in cache.shards:
            if entry["first"] != covered:
                raise UsageError(f"--teacher_cache {cache_dir}: its manifest's shards do not "
                                 f"follow each other (row {covered} is missing); rebuild it")
            covered += entry["rows"]
        if covered != cache.identity.rows:
            raise UsageError(f"--teacher_cache {cache_dir}: its shards hold {covered} of "
                             f"{cache.identity.rows} rows; rebuild it")
        differs = cache.identity.mismatch(run)
        if differs is not None:
            raise UsageError(f"--teacher_cache {cache_dir} was built for {differs}; rebuild it "
                             "with tsld-cache for this run's options")
        return cache

    def corrupt_shards(self, rank: int, world: int) -> list[str]:
        """This rank's share of the shards (every world-th) checked against the manifest: one
        line per shard that is missing, of the wrong size or of other contents."""
        problems = []
        for entry in self.shards[rank::world]:
            path = self.dir / entry["file"]
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif path.stat().st_size != entry["bytes"]:
                problems.append(f"{path} has {path.stat().st_size} bytes, the manifest "
                                f"{entry['bytes']}: truncated or overwritten")
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"{path} is corrupted (its SHA-256 differs from the manifest's)")
        return problems

    def partitioning(self) -> tuple[int, int]:
        """(elements of the teacher, elements this rank holds: none, it reads the cache)."""
        return self.manifest["teacher_numel"], 0

    def validation_perplexity(self, max_blocks: int | None) -> float:
        """The teacher's perplexity on the first `max_blocks` validation rows (all: None), from
        the NLL the cache build summed per row, as `perplexity` would compute it."""
        with safe_open(self.dir / VALIDATION, framework="pt") as f:
            nll, tokens = f.get_tensor("nll"), f.get_tensor("tokens")
        n = len(nll) if max_blocks is None else min(len(nll), max_blocks)
        return float(torch.exp(nll[:n].sum() / tokens[:n].sum()))

    def rows(self, indices) -> dict:
        """The cached tensors of training rows `indices`, stacked, on the host."""
        parts = []
        for index in indices.tolist():
            shard = int(np.searchsorted(self.firsts, index, side="right")) - 1
            handle = self._handle(shard)
            local = index - self.shards[shard]["first"]
            parts.append({name: handle.get_slice(name)[local:local + 1]
                          for name in handle.keys()})
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _handle(self, shard: int):
        if shard not in self._open:
            path = self.dir / self.shards[shard]["file"]
            try:
                self._open[shard] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise UsageError(f"teacher cache shard {path} cannot be read: {e}") from None
        return self._open[shard]

    def outputs(self, input_ids, *, rows, want_logits: bool = False, want_layers: bool = False):
        """A context manager yielding the `TeacherOutput` of training rows `rows` (host indices),
        on input_ids' device: full logits (--topk 0) or `TopKTeacher` rows."""
        if want_layers:
            raise ValueError("a teacher cache holds no layer outputs (--kd l2l)")
        cached = to_device(self.rows(rows), input_ids.device)
        if "logits" in cached:
            teacher = TeacherOutput(logits=cached["logits"])
        else:
            teacher = TeacherOutput(topk=TopKTeacher(cached["topk_logprobs"], cached["topk_ids"],
                                                     cached["target_logprob"],
                                                     has_tail=self.tail_samples == 0))
        return contextlib.nullcontext(teacher)  # nothing to gather or release
