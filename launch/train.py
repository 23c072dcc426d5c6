"""Quantization-aware training with token-scaled logit distillation on DeepSpeed ZeRO-3.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [options]   (see --help)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsld_ds.train.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
