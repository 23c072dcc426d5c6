"""Tokenize documents and pack them into fixed-length blocks for causal LM training."""

from __future__ import annotations

import pyarrow as pa
from datasets import Dataset, Features, Sequence, Value


def tokenize_and_pack(dataset: Dataset, tokenizer, block_size: int, *,
                      desc: str = "dataset") -> Dataset:
    """Return a dataset with one column "input_ids" of rows of exactly `block_size` token ids.

    Every document of `dataset` (column "text") is tokenized without special tokens and followed
    by the tokenizer's EOS; the whole stream is concatenated in order and cut into blocks, the
    final partial block dropped. Tokenization runs through `datasets.map`, so it is cached next
    to the dataset's files. `desc` names the dataset in the progress bar and in errors.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token to separate documents with")

    def tokenize(batch):
        # verbose=False: documents longer than the model's context are expected, they get packed.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        features=Features({"input_ids": Sequence(Value("int32"))}),
        desc=f"Tokenizing {desc}",
    )
    # Grouping is over the whole stream (not per map batch as in run_clm), so only the stream's
    # tail is dropped; it is an Arrow reshape, cheap next to tokenization.
    stream = tokenized.data.column("input_ids").combine_chunks().flatten()
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"{desc} has {len(stream)} tokens, fewer than one block of {block_size}: "
            "use a smaller block_size or more text"
        )
    blocks = pa.FixedSizeListArray.from_arrays(stream.slice(0, num_blocks * block_size), block_size)
    return Dataset(pa.table({"input_ids": blocks}))
