"""Will a QAT-KD run fit? Per-GPU memory and all-gather traffic, before anything loads.

    python launch/estimate.py --model llama-2-7b --num_gpus 8 --gradient_checkpointing  (--help)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsld_ds.capacity.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
