"""A distributed sampler that can stop mid-epoch and resume exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Shards a seeded permutation of `num_samples` indices across `num_replicas` ranks.

    Each epoch's order depends only on (seed, epoch); rank r takes positions r, r + R, r + 2R, ...
    of it, so the ranks' shares are disjoint and together cover the epoch. With `drop_last` the
    tail that does not divide evenly is left out; without it the order wraps around to pad it.

    `state_dict()` records the epoch and how many indices this rank has taken in it; after
    `load_state_dict()` the next iteration yields exactly the indices the uninterrupted run had
    left. Later iterations, and any after `set_epoch` moves to another epoch, start from the top.
    """

    def __init__(self, num_samples: int, *, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        per_rank = num_samples // num_replicas if drop_last else -(-num_samples // num_replicas)
        if per_rank < 1:
            raise ValueError(f"{num_samples} samples cannot give each of {num_replicas} ranks "
                             "one sample")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.per_rank = per_rank
        self.epoch = 0
        self.consumed = 0  # indices taken by this rank in the current epoch
        self._resume_at = 0  # where the next iteration starts

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = self._resume_at = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not 0 <= state["consumed"] <= self.per_rank:
            raise ValueError(
                f"consumed={state['consumed']} is outside this rank's epoch of {self.per_rank} "
                "samples"
            )
        self.epoch = state["epoch"]
        self.consumed = self._resume_at = state["consumed"]

    def _rank_indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = np.resize(order, self.per_rank * self.num_replicas)  # truncates or wraps around
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0
        self.consumed = start
        for index in self._rank_indices()[start:]:
            self.consumed += 1
            yield int(index)
