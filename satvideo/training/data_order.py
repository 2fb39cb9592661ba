"""Data order that a resumed run can continue exactly: seeded per epoch, split over ranks, in micro-batches.

Without buckets: each epoch a permutation of the whole dataset, rank r taking every world_size-th index, cut into
micro-batches. With buckets (data/buckets.py): every micro-batch from one bucket and all ranks in the same bucket at
each step. Both restart at any (epoch, micro-batch) with `set_position`, so a run resumed at a given micro-batch
sees exactly the samples it would have seen without the interruption.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Each epoch, a permutation seeded by (seed, epoch); rank r takes every world_size-th index.

    `set_position(epoch, start)` skips the first `start` samples of this rank's share.
    """

    def __init__(self, dataset_size: int, rank: int, world_size: int, seed: int):
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


class MicroBatches(Sampler[list[int]]):
    """This rank's micro-batches of ResumableSampler's order (the last, incomplete one of an epoch dropped)."""

    def __init__(self, dataset_size: int, micro_batch: int, rank: int, world_size: int, seed: int):
        self.samples = ResumableSampler(dataset_size, rank, world_size, seed)
        self.micro_batch = micro_batch
        self.batches_per_epoch = dataset_size // world_size // micro_batch

    def set_position(self, epoch: int, batch: int) -> None:
        self.samples.set_position(epoch, batch * self.micro_batch)

    def __len__(self) -> int:
        return len(self.samples) // self.micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.samples)
        for start in range(0, len(indices) - self.micro_batch + 1, self.micro_batch):
            yield indices[start:start + self.micro_batch]


class BucketBatches(Sampler[list[int]]):
    """Micro-batches that never mix buckets. Each epoch (seeded by seed + epoch, the same on every rank): each
    bucket's indices permuted and cut into global batches of world_size * micro_batch (the rest of a bucket dropped),
    the global batches shuffled; rank r takes the r-th micro-batch of each."""

    def __init__(self, groups: list[list[int]], micro_batch: int, rank: int, world_size: int, seed: int):
        self.groups, self.micro_batch, self.rank, self.world_size, self.seed = groups, micro_batch, rank, world_size, seed
        self.global_batch = micro_batch * world_size
        self.batches_per_epoch = sum(len(group) // self.global_batch for group in groups)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        global_batches = []
        for group in self.groups:
            order = torch.tensor(group, dtype=torch.long)[torch.randperm(len(group), generator=generator)]
            usable = len(group) // self.global_batch * self.global_batch
            global_batches += list(order[:usable].view(-1, self.global_batch))  # [batches, world * micro]
        mine = slice(self.rank * self.micro_batch, (self.rank + 1) * self.micro_batch)
        for position in torch.randperm(len(global_batches), generator=generator)[self.start:].tolist():
            yield global_batches[position][mine].tolist()
