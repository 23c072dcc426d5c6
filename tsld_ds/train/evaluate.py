"""Validation perplexity over every block of a split, sharded across ranks.

Under ZeRO-3 each forward is a collective (parameters are gathered from all ranks), so every rank
runs the same number of batches: ranks short of a full share run padding rows whose labels are
all ignored. Without a process group (`launch/eval.py`) the one process takes every block.
"""
import math

import torch
import torch.distributed as dist

from tsld_ds.devices import to_device

IGNORE_INDEX = -100


@torch.no_grad()
def perplexity(nll_fn, blocks, batch_size: int, *, device, max_blocks: int | None = None) -> float:
    """`nll_fn(input_ids, labels) -> (summed NLL, predicted tokens)` over non-overlapping blocks,
    fed on `device` (the engine's or the model's); the sums stay there until the end."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    mine += [-1] * (per_rank - len(mine))
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, per_rank, batch_size):
        idx = mine[start:start + batch_size]
        input_ids = torch.tensor(blocks[[max(i, 0) for i in idx]]["input_ids"], dtype=torch.long,
                                 device="cpu")
        labels = input_ids.clone()
        labels[torch.tensor([i < 0 for i in idx], device="cpu")] = IGNORE_INDEX
        batch = to_device({"input_ids": input_ids, "labels": labels}, device)
        nll, count = nll_fn(batch["input_ids"], batch["labels"])
        totals += torch.stack([nll.detach().double(), count.detach().double()])
    if distributed:
        dist.all_reduce(totals)
    return math.exp(totals[0].item() / totals[1].item())
