"""The rows a run trains and evaluates on, from any dataset: packed blocks of text, or one
instruction example per row (response-only labels). Training calls `dataset_rows` and
`launch/eval.py` calls `validation_rows`, which make a split's rows alike, so a run's validation
perplexity and eval.py's are over the same rows."""
from __future__ import annotations

from datasets import Dataset

from tsld_ds.data.instructions import instruction_rows
from tsld_ds.data.packing import tokenize_and_pack
from tsld_ds.data.text import load_splits


def dataset_rows(dataset: str, tokenizer, block_size: int, *, dataset_config=None,
                 text_column=None, seed: int = 0, log=None) -> tuple[Dataset, Dataset]:
    """(train, validation) rows of `block_size` tokens: column "input_ids", and "labels" for
    instruction data (text trains on every token: the loader copies the inputs). `log(line)`
    hears how instruction examples were cut."""
    train, validation, kind = load_splits(dataset, dataset_config, text_column=text_column,
                                          seed=seed)
    return (_split_rows(train, kind, tokenizer, block_size, desc=f"{dataset} train", log=log),
            _split_rows(validation, kind, tokenizer, block_size, desc=f"{dataset} validation",
                       log=log))


def validation_rows(dataset: str, tokenizer, block_size: int, *, dataset_config=None,
                    text_column=None, seed: int = 0, log=None) -> Dataset:
    """The validation rows of `dataset_rows`, without tokenizing the training split (a
    validation split carved out of the training rows still reads them, untokenized)."""
    _, validation, kind = load_splits(dataset, dataset_config, text_column=text_column,
                                      seed=seed)
    return _split_rows(validation, kind, tokenizer, block_size, desc=f"{dataset} validation",
                      log=log)


def _split_rows(examples: Dataset, kind: str, tokenizer, block_size: int, *, desc: str,
               log=None) -> Dataset:
    """One split's rows: documents of text (`kind` "text") packed into blocks, or instruction
    examples one per row."""
    if kind == "text":
        return tokenize_and_pack(examples, tokenizer, block_size, desc=desc)
    rows, counts = instruction_rows(examples, tokenizer, block_size, desc=desc)
    if log is not None:
        log(f"{desc}: {counts['examples']} {kind} examples, one per row of {block_size} tokens; "
            f"{counts['truncated']} truncated to --block_size, {counts['dropped']} dropped (no "
            "response token within the row)")
    return rows
