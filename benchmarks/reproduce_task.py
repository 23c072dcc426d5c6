"""The small task of benchmarks/reproduce.py's long preset: a contiguous stretch from the start of
a dataset's training text, every VALIDATION_EVERY-th document of it held out for validation (so
both come from the same books, as PTB's splits come from the same newspaper), written as a dataset
directory that launch/train.py and tsld-cache read like any other (train.jsonl,
validation.jsonl), with task.json saying what it is.
"""
import json
from pathlib import Path

from tsld_ds.data import dataset_rows, load_text_splits
from tsld_ds.models import load_tokenizer

TASK_RECORD = "task.json"
VALIDATION_EVERY = 5  # a fifth of the documents: validation text a quarter of the training text


def write_task_split(directory: Path, *, dataset: str, dataset_config, text_column, tokenizer: str,
                     train_tokens: int, block_size: int) -> dict:
    """Writes (once) the task: from the start of `dataset`'s training text, the documents that
    hold `train_tokens` tokens for training, with every VALIDATION_EVERY-th document between them
    for validation. Returns the task record: the request, and the tokens and blocks of each split
    as training packs them. A directory made by another request is refused: its runs would
    describe another task."""
    request = {"dataset": dataset, "dataset_config": dataset_config, "text_column": text_column,
               "tokenizer": tokenizer, "train_tokens": train_tokens, "block_size": block_size}
    record_path = directory / TASK_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["request"] != request:
            raise SystemExit(f"error: {directory} holds another task ({record['request']}); "
                             "choose another --output_root or remove it")
        return record
    tok = load_tokenizer(tokenizer)
    # In the dataset's order, a contiguous stretch; for a dataset without a validation split,
    # in the order after the loader carved one out (a shuffle), so a sample of its documents.
    documents = load_text_splits(dataset, dataset_config, text_column=text_column)[0]
    chosen, held_out, tokens = [], [], 0
    for i, text in enumerate(row["text"] for row in documents):
        if tokens >= train_tokens and i % VALIDATION_EVERY == 0:  # whole groups: one held out
            break
        if i % VALIDATION_EVERY == VALIDATION_EVERY - 1:
            held_out.append(text)
            continue
        chosen.append(text)
        tokens += len(tok(text, add_special_tokens=False)["input_ids"])
    if tokens < train_tokens or not held_out:
        raise SystemExit(f"error: --train_tokens {train_tokens}: the training text of {dataset} "
                         f"has only {tokens} tokens in {len(documents)} documents, of which "
                         f"every {VALIDATION_EVERY}th is held out")
    directory.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train", chosen), ("validation", held_out)):
        with open(directory / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    train_rows, validation_rows = dataset_rows(str(directory), tok, block_size)
    record = {"request": request, "train_documents": len(chosen),
              "validation_documents": len(held_out), "train_tokens": tokens,
              "train_blocks": len(train_rows), "validation_blocks": len(validation_rows)}
    record_path.write_text(json.dumps(record, indent=2))  # last: with it the task is complete
    return record
