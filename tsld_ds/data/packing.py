"""Tokenize documents and pack them into fixed-length blocks for causal LM training."""

from __future__ import annotations

import pyarrow as pa
from datasets import Dataset, Features, Sequence, Value

from tsld_ds.data.tokenizers import special_tokens_added


def document_separator(tokenizer) -> list[int]:
    """The ids that follow each document, tokenized by default, in the packed stream: the EOS
    where the tokenizer's defaults mark no document boundary (GPT-2's, the built-in one's),
    nothing where they do (LLaMA's BOS before each document, OPT's </s>), as Hugging Face's
    run_clm and the paper's code see the documents."""
    before, after = special_tokens_added(tokenizer)
    if before or after:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} marks no document boundary and "
                         "has no eos_token to separate documents with")
    return [tokenizer.eos_token_id]


def tokenize_and_pack(dataset: Dataset, tokenizer, block_size: int, *,
                      desc: str = "dataset") -> Dataset:
    """Return a dataset with one column "input_ids" of rows of exactly `block_size` token ids.

    Every document of `dataset` (column "text") is tokenized as the tokenizer does by default
    (its own special tokens) and followed by `document_separator`; the whole stream is
    concatenated in order and cut into blocks, the final partial block dropped. Tokenization
    runs through `datasets.map`, so it is cached next to the dataset's files. `desc` names the
    dataset in the progress bar and in errors.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    separator = document_separator(tokenizer)

    def tokenize(batch):
        # verbose=False: documents longer than the model's context are expected, they get packed.
        ids = tokenizer(batch["text"], verbose=False)["input_ids"]
        return {"input_ids": [doc + separator for doc in ids]}

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
