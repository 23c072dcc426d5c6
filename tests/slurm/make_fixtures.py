"""Writes what tests/conftest.py's `tiny_llama_dir` and `small_corpus_dir` fixtures and its
`write_ds_config` make, into DIR/{tiny-llama,corpus,ds.json}, for a SLURM job to train on.

    python tests/slurm/make_fixtures.py DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: conftest

from conftest import save_tiny_model, tiny_llama_config, write_ds_config  # noqa: E402


def small_corpus(path: Path) -> Path:
    """conftest's `small_corpus_dir` (a fixture, not callable outside pytest): the first verses
    of the built-in corpus as train/validation text files."""
    from tsld_ds.data import builtin_corpus_dir

    src = Path(builtin_corpus_dir())
    path.mkdir(parents=True, exist_ok=True)
    train = (src / "train.txt").read_text().splitlines()[:1500]
    val = (src / "validation.txt").read_text().splitlines()[:300]
    (path / "train.txt").write_text("\n".join(train) + "\n")
    (path / "validation.txt").write_text("\n".join(val) + "\n")
    return path


def main(root: Path) -> None:
    from transformers import AutoTokenizer

    from tsld_ds.data import builtin_tokenizer_path

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_path())
    save_tiny_model(root / "tiny-llama", tiny_llama_config(len(tokenizer)), tokenizer)
    small_corpus(root / "corpus")
    write_ds_config(root / "ds.json", exact_resume=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
