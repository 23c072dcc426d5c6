"""tsld-cache's options, typed: what `tsld_ds.cache.cli` parses and `tsld_ds.cache.build` builds
from."""
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    """tsld-cache's options, parsed once and checked (`parse_args`)."""
    output_dir: str
    teacher: str
    tokenizer: str | None
    dataset: str
    dataset_config: str | None
    text_column: str | None
    block_size: int
    seed: int
    topk: int
    tail_samples: int
    rows_per_shard: int | None
    ds_config: str
    teacher_ds_config: str | None
    attn_implementation: str | None
    dist_timeout: float
