"""Where the built-in corpus and tokenizer live inside the package (built by
launch/build_corpus.py)."""

from pathlib import Path

BUILTIN_DATASET = "builtin:kjv"

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def builtin_corpus_dir() -> Path:
    """Directory holding the King James Bible corpus: train.txt, validation.txt, SOURCE.md."""
    return _ASSETS / "kjv"


def builtin_tokenizer_path() -> Path:
    """Hugging Face tokenizer directory (LLaMA-style SentencePiece BPE, 4096 tokens) for the
    corpus."""
    return _ASSETS / "tokenizer"
