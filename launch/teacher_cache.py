"""The teacher's outputs computed once, for `launch/train.py --teacher_cache DIR`.

    deepspeed launch/teacher_cache.py --output_dir DIR [--topk K] [options]   (see --help)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsld_ds.cache.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
