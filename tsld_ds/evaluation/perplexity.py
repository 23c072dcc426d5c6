"""Validation perplexity, the one method training and `launch/eval.py` share: the validation
rows (non-overlapping packed blocks, or instruction examples scored on their responses), next-token
NLL from the final hidden states and the lm_head (the fused loss, so no [tokens, vocab] logits),
summed over all predicted tokens.

Under ZeRO-3 each forward is a collective (parameters are gathered from all ranks), so every rank
runs the same number of batches: ranks short of a full share run padding rows whose labels are
all ignored. Without a process group (`launch/eval.py`) the one process takes every block.
"""
import math

import torch
import torch.distributed as dist

from tsld_ds.data import validation_rows
from tsld_ds.devices import to_device
from tsld_ds.errors import UsageError
from tsld_ds.losses import FusedLinearCrossEntropyLoss
from tsld_ds.models import check_plain_lm_head, model_body

IGNORE_INDEX = -100
_LARGEST_EXP = math.log(1.7e308)  # math.exp of more overflows a float


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
        rows = blocks[[max(i, 0) for i in idx]]
        input_ids = torch.tensor(rows["input_ids"], dtype=torch.long, device="cpu")
        labels = torch.tensor(rows.get("labels", rows["input_ids"]), dtype=torch.long,
                              device="cpu")  # instruction rows: the response's tokens only
        labels[torch.tensor([i < 0 for i in idx], device="cpu")] = IGNORE_INDEX
        batch = to_device({"input_ids": input_ids, "labels": labels}, device)
        nll, count = nll_fn(batch["input_ids"], batch["labels"])
        totals += torch.stack([nll.detach().double(), count.detach().double()])
    if distributed:
        dist.all_reduce(totals)
    mean_nll = totals[0].item() / totals[1].item()
    if math.isnan(mean_nll) or mean_nll < _LARGEST_EXP:
        return math.exp(mean_nll)
    return math.inf  # diverged: exp would overflow


def summed_nll(hidden, weight, bias, labels, *, chunk_size: int | None = None,
               vocab_chunk_size: int | None = None):
    """(summed next-token NLL, number of predicted tokens) from the final hidden states and the
    lm_head, by the fused loss with these blocks (default: its own choice)."""
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    cross_entropy = FusedLinearCrossEntropyLoss(chunk_size=chunk_size,
                                                vocab_chunk_size=vocab_chunk_size)
    return cross_entropy(hidden, weight, labels, lm_head_bias=bias) * n_tokens, n_tokens


def validation_blocks(tokenizer, dataset: str, *, dataset_config=None, text_column=None,
                      seed: int = 42, block_size: int = 128):
    """The validation split's rows as training makes them; the training split is not tokenized."""
    try:
        return validation_rows(dataset, tokenizer, block_size, dataset_config=dataset_config,
                               text_column=text_column, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--dataset {dataset}: {e}") from None


@torch.no_grad()
def model_perplexity(model, blocks, *, batch_size: int = 8, max_blocks: int | None = None) -> float:
    check_plain_lm_head(model, "the model")
    head = model.get_output_embeddings()
    device = head.weight.device
    body = model_body(model)

    def nll(input_ids, labels):
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
        return summed_nll(hidden, head.weight, getattr(head, "bias", None), labels)

    return perplexity(nll, blocks, batch_size, device=device, max_blocks=max_blocks)
