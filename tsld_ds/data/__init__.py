"""Data: corpora as document splits, packing into token blocks, resumable sharded loading."""

from tsld_ds.data.builtin import BUILTIN_DATASET, builtin_corpus_dir, builtin_tokenizer_path
from tsld_ds.data.loader import EpochBatches, collate_blocks, make_dataloader
from tsld_ds.data.packing import tokenize_and_pack
from tsld_ds.data.sampler import ResumableDistributedSampler
from tsld_ds.data.text import load_text_splits
from tsld_ds.data.tokenizers import check_tokenizers_match

__all__ = [
    "BUILTIN_DATASET",
    "EpochBatches",
    "ResumableDistributedSampler",
    "builtin_corpus_dir",
    "builtin_tokenizer_path",
    "check_tokenizers_match",
    "collate_blocks",
    "load_text_splits",
    "make_dataloader",
    "tokenize_and_pack",
]
