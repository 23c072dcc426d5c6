"""Data: corpora as document splits or instruction examples, the rows a run trains on (packed
blocks or one example per row), resumable sharded loading."""

from tsld_ds.data.builtin import BUILTIN_DATASET, builtin_corpus_dir, builtin_tokenizer_path
from tsld_ds.data.instructions import instruction_rows
from tsld_ds.data.loader import EpochBatches, collate_blocks, make_dataloader
from tsld_ds.data.packing import document_separator, tokenize_and_pack
from tsld_ds.data.rows import dataset_rows, validation_rows
from tsld_ds.data.sampler import ResumableDistributedSampler
from tsld_ds.data.text import check_dataset_source, load_splits, load_text_splits
from tsld_ds.data.tokenizers import (
                                     bos_eos_added,
                                     check_tokenizers_match,
                                     save_tokenizer,
                                     special_tokens_added,
)

__all__ = [
    "BUILTIN_DATASET",
    "EpochBatches",
    "ResumableDistributedSampler",
    "bos_eos_added",
    "builtin_corpus_dir",
    "builtin_tokenizer_path",
    "check_dataset_source",
    "check_tokenizers_match",
    "collate_blocks",
    "dataset_rows",
    "document_separator",
    "instruction_rows",
    "load_splits",
    "load_text_splits",
    "make_dataloader",
    "save_tokenizer",
    "special_tokens_added",
    "tokenize_and_pack",
    "validation_rows",
]
