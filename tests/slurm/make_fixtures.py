"""Writes what tests/conftest.py's `tiny_llama_dir` and `small_corpus_dir` fixtures make, and the
DeepSpeed config of tests/train/test_slurm.py, into DIR/{tiny-llama,corpus,ds.json}, for a SLURM
job to train on.

    python tests/slurm/make_fixtures.py DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers

from helpers import save_tiny_model, tiny_llama_config, write_ds_config, write_small_corpus  # noqa: E402


def main(root: Path) -> None:
    from transformers import AutoTokenizer

    from tsld_ds.data import builtin_tokenizer_path

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_path())
    save_tiny_model(root / "tiny-llama", tiny_llama_config(len(tokenizer)), tokenizer)
    write_small_corpus(root / "corpus")
    write_ds_config(root / "ds.json", exact_resume=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
