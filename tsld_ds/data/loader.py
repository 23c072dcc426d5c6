"""DataLoader over packed blocks, yielding the batches a causal LM trains on."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from tsld_ds.data.sampler import ResumableDistributedSampler


def collate_blocks(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into {"input_ids", "labels"}, both LongTensor [B, L], unshifted (the loss
    shifts them), and "index" [B], each row's index in the dataset when the rows carry it (a
    teacher cache is looked up by it). Packed text rows are labelled with their inputs;
    instruction rows bring their own labels (-100 on prompts and padding)."""
    input_ids = torch.stack([row["input_ids"] for row in rows]).long()
    if "labels" in rows[0]:
        batch = {"input_ids": input_ids,
                 "labels": torch.stack([row["labels"] for row in rows]).long()}
    else:
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if "index" in rows[0]:
        batch["index"] = torch.tensor([row["index"] for row in rows], device="cpu")
    return batch


class _NumberedRows(torch.utils.data.Dataset):
    """A dataset's rows, each with its "index" in it."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {**self.rows[index], "index": index}


def make_dataloader(dataset: Dataset, batch_size: int, sampler: ResumableDistributedSampler, *,
                    pin_memory: bool = False) -> DataLoader:
    """A DataLoader over rows (column "input_ids", and "labels" when the rows have their own) in
    `sampler`'s order, in full batches (an epoch's incomplete last batch is dropped), each batch
    with its rows' "index".

    It runs in the calling process on purpose: rows are already tokenized, so fetching is cheap,
    and without worker prefetching the sampler has handed out exactly the samples the caller has
    received, which is what makes `sampler.state_dict()` an exact resume point.
    """
    return DataLoader(
        _NumberedRows(dataset.with_format("torch", columns=[c for c in ("input_ids", "labels")
                                                            if c in dataset.column_names])),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_blocks,
        drop_last=True,
        pin_memory=pin_memory,
    )


class EpochBatches:
    """Batches of `sampler`'s order without end, epoch after epoch (each a new seeded order). The
    sampler owns the data position: its `state_dict()` is where a resume starts."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableDistributedSampler, *,
                 pin_memory: bool = False):
        self.sampler = sampler
        self.loader = make_dataloader(dataset, batch_size, sampler, pin_memory=pin_memory)
        self._batches = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._batches)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._batches = iter(self.loader)
            return next(self._batches)
