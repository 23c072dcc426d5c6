"""How confident the teacher is on each token of a split, and the TSLD scale that gives it.

The weights come from the project's own `token_scale` over each block (a block is a
sequence, as in training), so the plot shows what training actually applies.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tsld_ds.data import dataset_rows
from tsld_ds.losses import next_token_targets, token_scale
from tsld_ds.models import load_tokenizer

IGNORE_INDEX = -100


@dataclass
class TeacherConfidence:
    teacher_ce: torch.Tensor                 # [tokens] the teacher's CE on each next token
    relative_scale: dict[float, torch.Tensor]  # τ -> [tokens] w_n · (tokens in its sequence)
    block_size: int

    @property
    def confidence(self) -> torch.Tensor:
        """p^T(y): the teacher's probability of the actual next token."""
        return torch.exp(-self.teacher_ce)

    @property
    def perplexity(self) -> float:
        return math.exp(self.teacher_ce.double().mean().item())


@torch.no_grad()
def teacher_confidence(teacher: str, dataset: str, *, temperatures: Sequence[float],
                       dataset_config: str | None = None, text_column: str | None = None,
                       seed: int = 42, block_size: int = 128, max_blocks: int | None = None,
                       batch_size: int = 8, split: str = "validation") -> TeacherConfidence:
    """Teacher CE and TSLD weights (scaled so that uniform weighting is 1) on the first
    ``max_blocks`` blocks of a split as training builds them: "validation", those it evaluates
    on; "train", those it trains on (in their stored order)."""
    tokenizer = load_tokenizer(teacher)
    train, validation = dataset_rows(dataset, tokenizer, block_size, dataset_config=dataset_config,
                                     text_column=text_column, seed=seed)
    blocks = {"train": train, "validation": validation}[split]
    count = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ce_parts, scale_parts = [], {t: [] for t in temperatures}
    for start in range(0, count, batch_size):
        rows = blocks[start:min(start + batch_size, count)]
        input_ids = torch.tensor(rows["input_ids"], dtype=torch.long)
        # instruction rows bring their own labels (responses only)
        labels = torch.tensor(rows.get("labels", rows["input_ids"]), dtype=torch.long)
        targets = next_token_targets(labels, IGNORE_INDEX)
        valid = targets != IGNORE_INDEX
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets)
        ce_parts.append(ce[valid])
        tokens_per_sequence = valid.sum(dim=-1, keepdim=True)
        for t in temperatures:
            scale_parts[t].append((token_scale(ce, valid, t) * tokens_per_sequence)[valid])
    return TeacherConfidence(torch.cat(ce_parts), {t: torch.cat(p) for t, p in scale_parts.items()},
                             block_size)
