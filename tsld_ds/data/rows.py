"""The rows a run trains and evaluates on, from any dataset: packed blocks of text, or one
instruction example per row (response-only labels). Training and `launch/eval.py` both call
`dataset_rows`, so a run's validation perplexity and eval.py's are over the same rows."""
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
    if kind == "text":
        return (tokenize_and_pack(train, tokenizer, block_size, desc=f"{dataset} train"),
                tokenize_and_pack(validation, tokenizer, block_size,
                                  desc=f"{dataset} validation"))
    rows = []
    for split, examples in (("train", train), ("validation", validation)):
        split_rows, counts = instruction_rows(examples, tokenizer, block_size,
                                              desc=f"{dataset} {split}")
        if log is not None:
            log(f"{dataset} {split}: {counts['examples']} {kind} examples, one per row of "
                f"{block_size} tokens; {counts['truncated']} truncated to --block_size, "
                f"{counts['dropped']} dropped (no response token within the row)")
        rows.append(split_rows)
    return rows[0], rows[1]
