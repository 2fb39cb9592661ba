"""Data order that a resumed run can continue exactly: a seeded permutation per epoch, split over ranks."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Each epoch, a permutation seeded by (seed, epoch); rank r takes every world_size-th index.

    `set_position(epoch, start)` skips the first `start` samples of this rank's share, so a run resumed at a
    given micro-batch sees exactly the samples it would have seen without the interruption.
    """

    def __init__(self, dataset_size: int, rank: int, world_size: int, seed: int):
        if dataset_size < world_size:
            raise ValueError(f"the dataset has {dataset_size} samples, fewer than the {world_size} ranks")
        self.dataset_size, self.rank, self.world_size, self.seed = dataset_size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.dataset_size // self.world_size - self.start

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        share = order[self.rank::self.world_size][: self.dataset_size // self.world_size]
        return iter(share[self.start:].tolist())
