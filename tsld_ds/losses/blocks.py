"""The fused loss's building blocks (docs/method.md §3.3): slices of token rows and vocabulary
entries, [rows, block width] views of reused flat buffers, logits written into them, and the
online log-sum-exp over vocabulary blocks. The chunk engine (`fused.py`) and the teacher forms
(`teacher_forms.py`) both work with these."""

import torch
import torch.nn.functional as F
from torch import Tensor


class RunningLogSumExp:
    """Per-row log Σ exp over vocabulary blocks seen one at a time: a running max and the sum of
    exp(z - running max), rescaled whenever the max grows."""

    def __init__(self, rows: int, dtype, device):
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)

    def add_exp_(self, block: Tensor) -> Tensor:
        """Folds in a [rows, width] block, which it overwrites with exp(block - new max).
        Returns the factor exp(old max - new max) by which sums over earlier blocks shrink."""
        new_max = torch.maximum(self.max, block.amax(dim=1))
        rescale = (self.max - new_max).exp()
        block.sub_(new_max[:, None]).exp_()
        self.sum = self.sum * rescale + block.sum(dim=1)
        self.max = new_max
        return rescale

    def start_shifted_(self, block: Tensor) -> None:
        """Starts from a first block already shifted to row max 0, overwritten with its exp
        (saves add_exp_'s max and subtraction passes)."""
        self.max = torch.zeros_like(self.max)
        self.sum = block.exp_().sum(dim=1)

    def log_sum_exp(self) -> Tensor:
        return self.max + self.sum.log()


def chunks(length: int, chunk_size: int):
    """Slices of [0, length) of chunk_size entries (the last one shorter): token rows or
    vocabulary entries."""
    return (slice(start, min(start + chunk_size, length))
            for start in range(0, length, chunk_size))


def block_view(buffer: Tensor, rows: int, cols: slice) -> Tensor:
    """A contiguous [rows, block width] view at the start of a flat reused buffer."""
    width = cols.stop - cols.start
    return buffer[: rows * width].view(rows, width)


def linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out = x @ weight.T (+ bias): the matmul runs in x's dtype, the result lands in out's dtype.

    Writing into a reused buffer matters on CPU, where a fresh [chunk, V] allocation costs more
    (page faults) than the matmul's own output writes.
    """
    if x.dtype != out.dtype:
        return out.copy_(F.linear(x, weight, bias))
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def targets_in(cols: slice, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(whether each row's target lies in the vocabulary block, its column in the block or 0)."""
    inside = (targets >= cols.start) & (targets < cols.stop)
    return inside, torch.where(inside, targets - cols.start, 0)
