"""Evaluate a training run, a converted (hf / packed) directory or any Hugging Face model.

    python launch/eval.py --model RUN_OR_MODEL [--dataset ...] [--tasks piqa,arc_easy]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsld_ds.evaluation.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
