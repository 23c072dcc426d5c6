"""Convert a training checkpoint to a Hugging Face (fake-quant or packed) model or a GGUF file.

    python launch/convert.py --checkpoint RUN_OR_CKPT_DIR --output OUT --format hf|packed|gguf
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsld_ds.convert.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
