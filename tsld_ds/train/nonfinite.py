"""NaN/inf losses. A micro-batch whose loss is not finite on any rank is dropped on every rank
before backward: under ZeRO-3 backward is collective, so all ranks must take the same branch.
After `limit` such batches in a row the run stops (the loop saves a checkpoint first) with a
message naming the loss terms that went bad and where."""
import sys

import torch
from tqdm import tqdm

from tsld_ds.errors import RunFailed


class NonFiniteLoss(RunFailed):
    """Too many batches in a row with a NaN/inf loss; the run stopped (every rank alike)."""


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def all_finite(self, names: list, values: torch.Tensor, step: int, rank: int) -> bool:
        """For a batch of step `step`, from every rank's loss terms (`values` [ranks, terms], the
        same on every rank, as the loop's one collective per micro-batch hands them out): True
        when all are finite; False when this batch must be dropped. Raises NonFiniteLoss at the
        `limit`-th bad batch in a row."""
        if torch.isfinite(values).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        where = _describe(names, values)
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(f"non-finite loss in {self.in_a_row} batch(es) in a row, the last "
                                f"at step {step}: {where} (--max_nonfinite_batches "
                                f"{self.limit})")
        if rank == 0:
            tqdm.write(f"warning: step {step}: non-finite loss, {where}; batch skipped on every "
                       f"rank ({self.in_a_row} in a row, stopping at {self.limit})",
                       file=sys.stderr)
        return False


def _describe(names: list, values: torch.Tensor) -> str:
    """'rank 1: gt=nan, loss=nan' for the bad terms of each rank, the components before 'loss'."""
    order = sorted(range(len(names)), key=lambda i: names[i] == "loss")
    parts = []
    for rank, row in enumerate(values.tolist()):
        bad = [f"{names[i]}={row[i]}" for i in order if not torch.isfinite(values[rank, i])]
        if bad:
            parts.append(f"rank {rank}: {', '.join(bad)}")
    return "; ".join(parts)
