#!/usr/bin/env python
"""Rebuild the built-in corpus (the King James Bible) and its tokenizer under tsld_ds/assets/.

Needs the `bible` program and its text from Debian's bible-kjv package
(`apt-get install bible-kjv`, which pulls in bible-kjv-text) and tsld-ds installed
(`pip install -e .`). Writes

  kjv/train.txt, kjv/validation.txt  one verse per line (references stripped), one chapter per
                                     document, documents separated by a blank line; every 20th
                                     chapter goes to validation
  kjv/SOURCE.md                      provenance, rebuild command and statistics
  tokenizer/                         SentencePiece BPE, 4096 tokens with byte fallback, trained on
                                     the train split, as a Hugging Face LlamaTokenizer directory
                                     that adds no special token by default (as training reads
                                     text: documents separated by EOS)

Rebuilding gives byte-identical files.
"""

import argparse
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer

# SentencePiece-only extractor (the convert_slow_tokenizer one needs protobuf, not a dependency).
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

from tsld_ds.data import builtin_corpus_dir, document_separator, load_text_splits, save_tokenizer

VERSE_LINE = re.compile(r"(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)")
KJV_VERSES = 31102
KJV_CHAPTERS = 1189
VALIDATION_EVERY = 20  # chapter i goes to validation when i % 20 == 19: ~5% of the text
VOCAB_SIZE = 4096
COPYRIGHT_FILE = Path("/usr/share/doc/bible-kjv-text/copyright")
REBUILD_COMMAND = "apt-get install bible-kjv && pip install -e . && python launch/build_corpus.py"


def read_chapters() -> list[list[str]]:
    """Every chapter of the KJV, in canonical order, as its list of verse texts."""
    if shutil.which("bible") is None:
        raise SystemExit("the `bible` program is missing: install it with "
                         "`apt-get install bible-kjv`")
    # -f prints one `Ge1:1 text` line per verse; a huge line width keeps verses unwrapped.
    output = subprocess.run(["bible", "-f", "-l", "100000", "Gen1:1-Rev22:21"],
                            check=True, capture_output=True, text=True).stdout
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in output.splitlines():
        match = VERSE_LINE.fullmatch(line)
        if match is None:
            raise RuntimeError(f"unexpected line in the output of `bible`: {line!r}")
        chapters.setdefault((match["book"], match["chapter"]), []).append(match["text"].rstrip())
    num_verses = sum(len(verses) for verses in chapters.values())
    if (num_verses, len(chapters)) != (KJV_VERSES, KJV_CHAPTERS):
        raise RuntimeError(f"expected {KJV_VERSES} verses in {KJV_CHAPTERS} chapters, "
                           f"got {num_verses} in {len(chapters)}")
    return list(chapters.values())


def write_corpus(chapters: list[list[str]], corpus_dir: Path) -> dict[str, list[str]]:
    """Write train.txt and validation.txt; return each split's documents."""
    documents = {"train": [], "validation": []}
    for i, verses in enumerate(chapters):
        split = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        documents[split].append("\n".join(verses))
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in documents.items():
        (corpus_dir / f"{split}.txt").write_text("\n\n".join(docs) + "\n")
    return documents


def train_tokenizer(documents: list[str], tokenizer_dir: Path) -> None:
    """Train SentencePiece BPE on `documents` and save it as a Hugging Face LlamaTokenizer that
    adds no BOS or EOS by default: training tokenizes each document with its tokenizer's defaults,
    and this corpus's documents are separated by EOS, so a stock `AutoTokenizer` reads a text as
    training did."""
    model = io.BytesIO()  # in memory: a model_prefix would be recorded in the model file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),  # whole chapters, so pieces learn the verse breaks
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,  # any text encodes: characters outside the vocabulary become bytes
        character_coverage=1.0,
        # Identity normalization and no dummy prefix: decode(encode(text)) == text exactly.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,  # deterministic
        minloglevel=2,
    )
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    tokenizer_dir.mkdir(parents=True)
    model_file = tokenizer_dir / "tokenizer.model"
    model_file.write_bytes(model.getvalue())
    vocab, _, merges = SentencePieceExtractor(str(model_file)).extract()
    save_tokenizer(LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", add_prefix_space=False,
                                  add_bos_token=False, add_eos_token=False), tokenizer_dir)
    reference = spm.SentencePieceProcessor(model_file=str(model_file)).encode(documents)
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    if reloaded(documents)["input_ids"] != reference:
        raise RuntimeError("the Hugging Face tokenizer encodes the corpus by default differently "
                           "from SentencePiece")


def token_statistics(documents: dict[str, list[str]], tokenizer) -> dict:
    """Tokens per split as packed for training (`tsld_ds.data.tokenize_and_pack`: documents
    tokenized by default, each followed by EOS) and the validation perplexity of an
    add-one-smoothed unigram model of the train tokens: the floor any LM should beat."""
    separator = document_separator(tokenizer)
    streams = {
        split: np.array([t for ids in tokenizer(docs)["input_ids"] for t in (*ids, *separator)])
        for split, docs in documents.items()
    }
    counts = np.bincount(streams["train"], minlength=len(tokenizer)) + 1
    log_probs = np.log(counts / counts.sum())
    return {
        "tokens": {split: len(stream) for split, stream in streams.items()},
        "unigram_ppl": math.exp(-log_probs[streams["validation"]].mean()),
    }


def public_domain_statement() -> str:
    paragraphs = re.split(r"\n\s*\n", COPYRIGHT_FILE.read_text())
    statement = next(p for p in paragraphs if "King James Version text" in p)
    return " ".join(statement.split())


def package_version() -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", "bible-kjv-text"],
                          check=True, capture_output=True, text=True).stdout


def write_source(corpus_dir: Path, documents: dict[str, list[str]], stats: dict) -> None:
    rows = []
    for split, docs in documents.items():
        path = corpus_dir / f"{split}.txt"
        verses = sum(doc.count("\n") + 1 for doc in docs)
        rows.append(f"| {split} | {path.stat().st_size:,} | {len(docs):,} | {verses:,} "
                    f"| {stats['tokens'][split]:,} |")
    # A backslash at a line's end joins it to the next: SOURCE.md keeps its lines as they are.
    (corpus_dir / "SOURCE.md").write_text(f"""# Built-in corpus: the King James Bible

Source: Debian package `bible-kjv-text` version {package_version()}, read with its `bible`
program (Debian package `bible-kjv`). Its copyright file ({COPYRIGHT_FILE}) states:

> {public_domain_statement()}

The text is public domain.

Format: one verse per line with its reference stripped, one chapter per document, documents
separated by a blank line. Chapter i (0-based, canonical order Genesis 1 .. Revelation 22) is in
validation.txt when i % {VALIDATION_EVERY} == {VALIDATION_EVERY - 1}, in train.txt otherwise.

Rebuild (writes this directory and ../tokenizer, byte-identical):

    {REBUILD_COMMAND}

| split | bytes | chapters | verses | tokens |
| --- | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

Tokens: the built-in tokenizer (../tokenizer: SentencePiece BPE, \
{VOCAB_SIZE} tokens, byte fallback,
trained on train.txt) with one EOS after each document, as \
`tsld_ds.data.tokenize_and_pack` packs them.
Validation perplexity of a unigram model of the train tokens (add-one smoothing): \
{stats['unigram_ppl']:.1f}.
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets_dir", type=Path, default=builtin_corpus_dir().parent,
                        help="where kjv/ and tokenizer/ go (default: the package's assets)")
    args = parser.parse_args()
    corpus_dir, tokenizer_dir = args.assets_dir / "kjv", args.assets_dir / "tokenizer"

    written = write_corpus(read_chapters(), corpus_dir)
    train, validation = load_text_splits(str(corpus_dir))
    documents = {"train": list(train["text"]), "validation": list(validation["text"])}
    if documents != written:
        raise RuntimeError("load_text_splits does not read back the documents that were written")
    train_tokenizer(documents["train"], tokenizer_dir)
    stats = token_statistics(documents, AutoTokenizer.from_pretrained(tokenizer_dir))
    write_source(corpus_dir, documents, stats)
    print((corpus_dir / "SOURCE.md").read_text())


if __name__ == "__main__":
    main()
