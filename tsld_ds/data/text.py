"""Load a dataset as train and validation splits: documents of text (one "text" column each),
or instruction examples (`prompt`/`response` or `messages` columns, `tsld_ds.data.instructions`).

Sources: the built-in corpus, a Hugging Face hub dataset, a local directory or a single file.
In .txt files documents are separated by blank lines (a file without one is one document); in
.json/.jsonl files and hub datasets every row is a document, or an example.
"""

from __future__ import annotations

import codecs
import functools
import os
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, Value, load_dataset
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetGenerationError

from tsld_ds.data.builtin import BUILTIN_DATASET, builtin_corpus_dir
from tsld_ds.data.instructions import MESSAGES, PROMPT, RESPONSE, instruction_format

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".json", ".jsonl")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES
# A hub dataset is "name" or "org/name"; anything else that is not on disk is a mistyped path.
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def load_splits(
    dataset: str | os.PathLike = BUILTIN_DATASET,
    dataset_config: str | None = None,
    *,
    text_column: str | None = None,
    validation_split: float = 0.05,
    seed: int = 0,
) -> tuple[Dataset, Dataset, str]:
    """Return (train, validation, kind). kind "text": documents with a single "text" column;
    kind "prompt/response" or "messages": instruction examples with those columns (a dataset
    that has them, unless `text_column` names the text).

    `dataset` is "builtin:kjv", a hub name (with `dataset_config`, e.g. "wikitext" and
    "wikitext-2-raw-v1"), a directory or a .txt/.json/.jsonl file. Where the source has no
    validation split, a `validation_split` fraction of the training rows is carved out,
    shuffled with `seed`. The text column is `text_column`, else "text", else the only string
    column. Documents that are empty or whitespace only are dropped.
    """
    dataset = os.fspath(dataset)
    splits = _load_raw_splits(dataset, dataset_config)
    if "train" not in splits:
        raise ValueError(f"dataset {dataset!r} has no 'train' split; its splits are {list(splits)}")
    kind = None if text_column else instruction_format(splits["train"].column_names)
    if kind is None:
        column = _text_column(splits["train"], text_column, dataset)
        prepare = functools.partial(_documents, column=column)
    else:
        prepare = functools.partial(_examples, kind=kind)
    rows = {split: prepare(splits[split], name=f"{dataset} {split}")
            for split in ("train", "validation") if split in splits}
    if "validation" in rows:
        return rows["train"], rows["validation"], kind or "text"
    return (*_carve_validation(rows["train"], validation_split, seed, dataset), kind or "text")


def load_text_splits(dataset: str | os.PathLike = BUILTIN_DATASET,
                     dataset_config: str | None = None, **options) -> tuple[Dataset, Dataset]:
    """(train, validation) documents of a text dataset (`load_splits`' options)."""
    train, validation, kind = load_splits(dataset, dataset_config, **options)
    if kind != "text":
        raise ValueError(f"dataset {os.fspath(dataset)!r} holds {kind} examples, not text")
    return train, validation


def _load_raw_splits(dataset: str, dataset_config: str | None) -> DatasetDict:
    if dataset.startswith("builtin:"):
        return _load_builtin(dataset)
    path = Path(dataset).expanduser()
    if path.is_dir():
        return _load_directory(path)
    if path.is_file():
        return _load_files({"train": [str(path)]})
    if not _HUB_NAME.fullmatch(dataset) or dataset.startswith((".", "~")) or \
            path.suffix in SUPPORTED_SUFFIXES:
        raise FileNotFoundError(f"dataset path {dataset!r} does not exist")
    try:  # from the hub, or offline from its cache
        return load_dataset(dataset, dataset_config)
    except ConnectionError as e:  # not cached and the hub out of reach (or offline)
        raise FileNotFoundError(f"dataset {dataset!r} is not a local path, nor in the datasets "
                                f"cache, and the Hugging Face hub could not be reached: {e}") \
            from None


def _load_builtin(name: str) -> DatasetDict:
    if name != BUILTIN_DATASET:
        raise ValueError(f"unknown built-in dataset {name!r}; the built-in dataset is {BUILTIN_DATASET!r}")
    corpus = builtin_corpus_dir()
    files = {split: corpus / f"{split}.txt" for split in ("train", "validation")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"built-in corpus files {missing} are missing; rebuild them with `python launch/build_corpus.py`"
        )
    return _load_files({split: [str(f)] for split, f in files.items()})


def _load_directory(directory: Path) -> DatasetDict:
    """Files named after their split (train*, valid*/dev*, ...) by the `datasets` convention; all
    files are training data when none is named so."""
    try:
        patterns = get_data_patterns(str(directory))
        found = DataFilesDict.from_patterns(patterns, base_path=str(directory), allowed_extensions=list(SUPPORTED_SUFFIXES))
    except FileNotFoundError:  # no files at all, or none of a split's files has a supported type
        found = {}
    data_files = {split: list(found[split]) for split in ("train", "validation") if found.get(split)}
    if not data_files:
        raise FileNotFoundError(f"directory {str(directory)!r} has no .txt, .json or .jsonl data files")
    return _load_files(data_files)


def _load_files(data_files: dict[str, list[str]]) -> DatasetDict:
    files = sorted(f for split_files in data_files.values() for f in split_files)
    suffixes = {Path(f).suffix for f in files}
    if not suffixes <= set(SUPPORTED_SUFFIXES):
        raise ValueError(
            f"unsupported file type {', '.join(sorted(suffixes - set(SUPPORTED_SUFFIXES)))} in {files}: "
            "use .txt (documents separated by blank lines), .json or .jsonl"
        )
    empty = [f for f in files if Path(f).stat().st_size == 0]
    if empty:
        raise ValueError(f"data files {empty} are empty")
    if suffixes <= set(TEXT_SUFFIXES):
        try:
            splits = load_dataset("text", data_files=data_files, sample_by="paragraph")
        except DatasetGenerationError:  # a file that is not text: say which, and where
            for file in files:
                _check_utf8(Path(file))
            raise
        # Paragraph splitting leaves the file's final newline (and extra blank lines) on the edges.
        return splits.map(lambda batch: {"text": [t.strip("\n") for t in batch["text"]]}, batched=True)
    if suffixes <= set(JSON_SUFFIXES):
        return load_dataset("json", data_files=data_files)
    raise ValueError(f"data files mix .txt and .json/.jsonl: {files}; keep one format")


def _check_utf8(file: Path) -> None:
    """A text file that is not UTF-8 (a binary file named .txt) is named with the offset of its
    first bad byte. Read only when the datasets library failed, so a good corpus is read once."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise ValueError(f"{file} is not UTF-8 text: byte {offset + e.start} "
                                 f"(0x{block[e.start]:02x}) cannot be decoded") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text: it ends inside a character") from None


def _text_column(split: Dataset, text_column: str | None, name: str) -> str:
    columns = split.features
    described = ", ".join(f"{c} ({getattr(f, 'dtype', type(f).__name__)})" for c, f in columns.items())
    if text_column is None:
        strings = [c for c, f in columns.items() if _is_string(f)]
        if "text" in columns:
            text_column = "text"
        elif len(strings) == 1:
            text_column = strings[0]
        else:
            raise ValueError(
                f"cannot tell which column of dataset {name!r} holds the text; its columns are {described}: "
                "pass text_column"
            )
    if text_column not in columns:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; its columns are {described}")
    if not _is_string(columns[text_column]):
        raise ValueError(f"column {text_column!r} of dataset {name!r} is not text; its columns are {described}")
    return text_column


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _documents(split: Dataset, column: str, name: str) -> Dataset:
    split = split.select_columns([column])
    if column != "text":
        split = split.rename_column(column, "text")
    split = split.filter(lambda batch: [bool(t and not t.isspace()) for t in batch["text"]], batched=True)
    if len(split) == 0:
        raise ValueError(f"dataset {name!r} has no text")
    return split


def _examples(split: Dataset, kind: str, name: str) -> Dataset:
    """Instruction examples of `kind` with their columns checked (strings, or a list of
    role/content messages)."""
    features = split.features
    missing = [c for c in ((MESSAGES,) if kind == MESSAGES else (PROMPT, RESPONSE))
               if c not in features]
    if missing:
        raise ValueError(f"dataset {name!r} has no column(s) {missing} (the train split's "
                         f"{kind} examples need them); its columns are {list(features)}")
    if kind == MESSAGES:
        message = features[MESSAGES]
        message = message[0] if isinstance(message, list) else getattr(message, "feature", None)
        if not (isinstance(message, dict) and _is_string(message.get("role"))
                and _is_string(message.get("content"))):
            raise ValueError(f"column 'messages' of dataset {name!r} must be a list of "
                             f"{{'role': ..., 'content': ...}} objects, got {features[MESSAGES]}")
        return split.select_columns([MESSAGES])
    bad = [c for c in (PROMPT, RESPONSE) if not _is_string(features[c])]
    if bad:
        raise ValueError(f"columns {bad} of dataset {name!r} must hold text, got "
                         f"{[str(features[c]) for c in bad]}")
    return split.select_columns([PROMPT, RESPONSE])


def _carve_validation(train: Dataset, fraction: float, seed: int, name: str) -> tuple[Dataset, Dataset]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split must be in (0, 1), got {fraction}")
    if len(train) < 2:
        raise ValueError(
            f"dataset {name!r} has no validation split and only {len(train)} row, too few to carve one "
            "from: separate documents with blank lines or provide a validation file"
        )
    parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
