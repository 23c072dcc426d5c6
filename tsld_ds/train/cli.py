"""`launch/train.py` / `tsld-train`: parse options, run, and turn bad input into one clear line."""
import sys
import warnings

import torch.distributed as dist

from tsld_ds.errors import UsageError
from tsld_ds.train.args import parse_args


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch.distributed deprecation notices raised from inside DeepSpeed, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from tsld_ds.train.loop import train  # heavy imports after --help and option errors

    try:
        train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
