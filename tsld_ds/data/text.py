"""Load a dataset as train and validation splits: documents of text (one "text" column each),
or instruction examples (`prompt`/`response` or `messages` columns, `tsld_ds.data.instructions`).

Sources: the built-in corpus, a Hugging Face hub dataset, a local directory or a single file.
In .txt files documents are separated by blank lines (a file without one is one document); in
.json/.jsonl files and hub datasets every row is a document, or an example.
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import os
import re
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Value, load_dataset
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetGenerationError

from tsld_ds.data.builtin import BUILTIN_DATASET, builtin_corpus_dir
from tsld_ds.data.instructions import MESSAGES, PROMPT, RESPONSE, instruction_format

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".json", ".jsonl")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES
# The datasets library's JSON reader, which logs its own account of a file it cannot read.
_JSON_LOG = logging.getLogger("datasets.packaged_modules.json.json")
_FORMATS = "use .txt (documents separated by blank lines), .json or .jsonl"
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
    files = _data_files(dataset)
    splits = _load_hub(dataset, dataset_config) if files is None else _load_files(files)
    _check_train_split(splits, dataset)
    kind = None if text_column else instruction_format(splits["train"].column_names)
    column = _text_column(splits["train"], text_column, dataset) if kind is None else None
    rows = {split: _documents(splits[split], column, f"{dataset} {split}") if kind is None
            else _examples(splits[split], kind, f"{dataset} {split}",
                           files=None if files is None else files[split])
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


def check_dataset_source(dataset: str | os.PathLike) -> None:
    """Refuse a dataset that `load_splits` would refuse before reading any of its data, without
    reading it: a path that does not exist, an unknown built-in, a directory or file without
    .txt, .json or .jsonl data (a .csv, say), empty or mixed data files, no training split. Cheap
    and local (a hub name is left to loading), so a command can call it before any process
    group starts. Raises ValueError or FileNotFoundError, as `load_splits` does."""
    _data_files(os.fspath(dataset))


def _data_files(dataset: str) -> dict[str, list[str]] | None:
    """{split: files} of a built-in or local dataset, checked as `_load_files` needs them; None
    for a hub dataset."""
    path = Path(dataset).expanduser()
    if dataset.startswith("builtin:"):
        files = _builtin_files(dataset)
    elif path.is_dir():
        files = _directory_files(path)
    elif path.is_file():
        files = {"train": [str(path)]}
    elif not _HUB_NAME.fullmatch(dataset) or dataset.startswith((".", "~")) or \
            path.suffix in SUPPORTED_SUFFIXES:
        raise FileNotFoundError(f"dataset path {dataset!r} does not exist")
    else:
        return None
    _check_train_split(files, dataset)
    _check_files(sorted(f for split_files in files.values() for f in split_files))
    return files


def _check_train_split(splits, dataset: str) -> None:
    if "train" not in splits:
        raise ValueError(f"dataset {dataset!r} has no 'train' split; its splits are "
                         f"{list(splits)}")


def _load_hub(dataset: str, dataset_config: str | None) -> DatasetDict:
    try:  # from the hub, or offline from its cache
        return load_dataset(dataset, dataset_config)
    except ConnectionError as e:  # not cached and the hub out of reach (or offline)
        raise FileNotFoundError(f"dataset {dataset!r} is not a local path, nor in the datasets "
                                f"cache, and the Hugging Face hub could not be reached: {e}") \
            from None


def _builtin_files(name: str) -> dict[str, list[str]]:
    if name != BUILTIN_DATASET:
        raise ValueError(f"unknown built-in dataset {name!r}; the built-in dataset is "
                         f"{BUILTIN_DATASET!r}")
    corpus = builtin_corpus_dir()
    files = {split: corpus / f"{split}.txt" for split in ("train", "validation")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"built-in corpus files {missing} are missing; rebuild them with "
                                "`python launch/build_corpus.py`")
    return {split: [str(f)] for split, f in files.items()}


def _directory_files(directory: Path) -> dict[str, list[str]]:
    """Files named after their split (train*, valid*/dev*, ...) by the `datasets` convention; all
    files are training data when none is named so. Of a split's files those of a type the
    loader reads are kept (a README beside them is no data); a split with files but none of
    those types is refused rather than left out (a validation.csv is meant as validation data)."""
    try:
        patterns = get_data_patterns(str(directory))
    except FileNotFoundError:  # no files at all
        patterns = {}
    files = {}
    for split in ("train", "validation"):
        if split not in patterns:
            continue
        found = DataFilesDict.from_patterns({split: patterns[split]}, base_path=str(directory),
                                            allowed_extensions=list(SUPPORTED_SUFFIXES))[split]
        if found:
            files[split] = list(found)
            continue
        names = sorted(Path(f).name for f in DataFilesDict.from_patterns(
            {split: patterns[split]}, base_path=str(directory))[split])
        raise ValueError(f"directory {str(directory)!r} holds {split} files of a type not read "
                         f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
                         f"{_FORMATS}")
    if not files:
        raise FileNotFoundError(f"directory {str(directory)!r} has no .txt, .json or .jsonl data "
                                "files")
    return files


def _check_files(files: list[str]) -> None:
    suffixes = {Path(f).suffix for f in files}
    if not suffixes <= set(SUPPORTED_SUFFIXES):
        raise ValueError(f"unsupported file type "
                         f"{', '.join(sorted(suffixes - set(SUPPORTED_SUFFIXES)))} in {files}: "
                         f"{_FORMATS}")
    empty = [f for f in files if Path(f).stat().st_size == 0]
    if empty:
        raise ValueError(f"data files {empty} are empty")
    if not (suffixes <= set(TEXT_SUFFIXES) or suffixes <= set(JSON_SUFFIXES)):
        raise ValueError(f"data files mix .txt and .json/.jsonl: {files}; keep one format")


def _load_files(data_files: dict[str, list[str]]) -> DatasetDict:
    """The splits of files `_data_files` checked; a file the datasets library cannot read is
    named, with the line at fault in a .json/.jsonl file."""
    files = sorted(f for split_files in data_files.values() for f in split_files)
    text = all(Path(f).suffix in TEXT_SUFFIXES for f in files)
    level = _JSON_LOG.level
    _JSON_LOG.setLevel(logging.CRITICAL)  # its "row N" counts from a block's start: we say where
    try:
        if not text:
            return load_dataset("json", data_files=data_files)
        splits = load_dataset("text", data_files=data_files, sample_by="paragraph")
    except DatasetGenerationError as e:  # read only now, so a good dataset is read once
        for file in files:
            _check_utf8(Path(file))
            if not text:
                for _ in _json_rows(Path(file)):
                    pass
        cause = " ".join(str(e.__cause__ or e).split())
        raise ValueError(f"the datasets library cannot read {files}: {cause}") from None
    finally:
        _JSON_LOG.setLevel(level)
    # Paragraph splitting leaves the file's final newline (and extra blank lines) on the edges.
    return splits.map(lambda batch: {"text": [t.strip("\n") for t in batch["text"]]},
                      batched=True)


def _check_utf8(file: Path) -> None:
    """A file that is not UTF-8 (a binary file named .txt or .jsonl) is named with the offset of
    its first bad byte. Read only when the datasets library failed, so a good corpus is read
    once."""
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


def _json_rows(file: Path):
    """(where, row) for each row of a .json/.jsonl file, as the datasets library reads it: the
    elements of a file that is one JSON list, else one JSON object per non-blank line. A row
    that is not one is a ValueError naming the file and its line (the library's own message
    counts rows from the start of the block it was reading)."""
    with open(file, "rb") as f:
        if f.read(len(codecs.BOM_UTF8) + 1).removeprefix(codecs.BOM_UTF8).startswith(b"["):
            f.seek(0)
            try:
                rows = json.loads(f.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} line {e.lineno} is not valid JSON: "
                                 f"{e.msg.removesuffix(' at')} at column {e.colno}") from None
            yield from ((f"{file} element {i} of its list (from 0)", row)
                        for i, row in enumerate(rows))
            return
        f.seek(0)
        for number, line in enumerate(f, 1):  # lines end at b"\n" only, as an editor counts
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip(b"\r\n"))  # a column past its end, not "line 2"
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} line {number} is not valid JSON: "
                                 f"{e.msg.removesuffix(' at')} at column {e.colno}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file} line {number} is a JSON {type(row).__name__}, not an "
                                 "object of one row's columns")
            yield f"{file} line {number}", row


def _text_column(split: Dataset, text_column: str | None, name: str) -> str:
    columns = split.features
    described = ", ".join(f"{c} ({getattr(f, 'dtype', type(f).__name__)})"
                          for c, f in columns.items())
    if text_column is None:
        strings = [c for c, f in columns.items() if _is_string(f)]
        if "text" in columns:
            text_column = "text"
        elif len(strings) == 1:
            text_column = strings[0]
        else:
            raise ValueError(
                f"cannot tell which column of dataset {name!r} holds the text; its columns are "
                f"{described}: pass text_column"
            )
    if text_column not in columns:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; its columns are "
                         f"{described}")
    if not _is_string(columns[text_column]):
        raise ValueError(f"column {text_column!r} of dataset {name!r} is not text; its columns "
                         f"are {described}")
    return text_column


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _documents(split: Dataset, column: str, name: str) -> Dataset:
    split = split.select_columns([column])
    if column != "text":
        split = split.rename_column(column, "text")
    split = split.filter(lambda batch: [bool(t and not t.isspace()) for t in batch["text"]],
                         batched=True)
    if len(split) == 0:
        raise ValueError(f"dataset {name!r} has no text")
    return split


def _examples(split: Dataset, kind: str, name: str, files: list[str] | None) -> Dataset:
    """Instruction examples of `kind` with their columns checked (strings, or a list of
    role/content messages) and none null, from `files` when they came from files."""
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
    else:
        bad = [c for c in (PROMPT, RESPONSE) if not _is_string(features[c])]
        if bad:
            raise ValueError(f"columns {bad} of dataset {name!r} must hold text, got "
                             f"{[str(features[c]) for c in bad]}")
    split = split.select_columns([MESSAGES] if kind == MESSAGES else [PROMPT, RESPONSE])
    _check_no_nulls(split, kind, name, files)
    return split


def _check_no_nulls(split: Dataset, kind: str, name: str, files: list[str] | None) -> None:
    """Refuse an example whose prompt, response or messages (or a message's role or content) is
    null or absent, by its file and line, else (a hub dataset) by its row."""
    table = split.data.table
    if kind == MESSAGES:
        messages = table.column(MESSAGES)
        turns = pc.list_flatten(messages)
        nulls = messages.null_count + sum(pc.struct_field(turns, key).null_count
                                          for key in ("role", "content"))
    else:
        nulls = sum(table.column(c).null_count for c in (PROMPT, RESPONSE))
    if not nulls:
        return
    # The first found in the files is the one to name; the rows themselves are the fallback.
    rows = itertools.chain(
        (row for file in files or () for row in _json_rows(Path(file))),
        ((f"dataset {name!r} row {i} (from 0)", row) for i, row in enumerate(split)))
    for where, row in rows:
        lacking = _lacking(row, kind)
        if lacking:
            raise ValueError(f"{where} {lacking}")


def _lacking(example: dict, kind: str) -> str | None:
    """What of an instruction example is null or absent, e.g. "has a null 'response'"."""
    def lacks(row, key):
        return f"has a null {key!r}" if key in row else f"has no {key!r}"

    if kind != MESSAGES:
        return next((lacks(example, c) for c in (PROMPT, RESPONSE) if example.get(c) is None),
                    None)
    if example.get(MESSAGES) is None:
        return lacks(example, MESSAGES)
    for i, message in enumerate(example[MESSAGES], 1):
        for key in ("role", "content"):
            if isinstance(message, dict) and message.get(key) is None:
                return f"{lacks(message, key)} in message {i}"
    return None


def _carve_validation(train: Dataset, fraction: float, seed: int,
                      name: str) -> tuple[Dataset, Dataset]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split must be in (0, 1), got {fraction}")
    if len(train) < 2:
        raise ValueError(
            f"dataset {name!r} has no validation split and only {len(train)} row, too few to "
            "carve one from: separate documents with blank lines or provide a validation file"
        )
    parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
