"""Training-time draws of discrete timesteps and their noise levels."""

from __future__ import annotations

import torch
from torch import Tensor

from satvideo import distributed
from satvideo.diffusion.discretization import timestep_alphas


def timestep_interval(rank: int, world_size: int, num_idx: int, group_num: int = 0) -> tuple[int, int]:
    """[low, high) of the timesteps a rank draws from when the ranks stratify [0, num_idx) between them.

    As the original: G = group_num groups of world_size / G consecutive ranks, group g drawing from
    [g * w, (g + 1) * w) with w = num_idx // G (when G does not divide num_idx, the last num_idx % G
    timesteps are never drawn). Where the original stops (group_num 0, or one that does not divide world_size),
    satvideo goes on: group_num 0 means one group per rank, G is capped at world_size and num_idx, rank r is in
    group r * G // world_size, and group g draws from [g * num_idx // G, (g + 1) * num_idx // G), so that every
    timestep is drawn by some rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if group_num and world_size % group_num == 0 and group_num <= num_idx:  # the original's case
        width = num_idx // group_num
        group = rank // (world_size // group_num)
        return group * width, (group + 1) * width
    groups = min(group_num or world_size, world_size, num_idx)
    group = rank * groups // world_size
    return group * num_idx // groups, (group + 1) * num_idx // groups


class DiscreteSampling:
    """Uniform draws of raw timesteps in [0, num_idx), returned with their alphas.

    With `uniform_sampling` each data-parallel rank draws only from its own interval (see timestep_interval),
    which spreads the timesteps of a global batch evenly; as in the original this happens only with at least
    `uniform_sampling_min_ranks` ranks (9: the original ignores the flag on 8 ranks or fewer; 2 stratifies at
    any world size). rank and world_size default to torch.distributed's, read at each call; pass them to pin
    them (tests).
    """

    def __init__(
        self,
        discretization_config: dict,
        num_idx: int,
        do_append_zero: bool = False,
        flip: bool = True,
        uniform_sampling: bool = False,
        group_num: int = 0,
        uniform_sampling_min_ranks: int = 9,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.num_idx = num_idx
        self.alphas_cumprod_sqrt = timestep_alphas(discretization_config, num_idx, do_append_zero, flip)
        self.uniform_sampling = uniform_sampling
        self.group_num = group_num
        self.uniform_sampling_min_ranks = uniform_sampling_min_ranks
        self.rank = rank
        self.world_size = world_size

    def interval(self) -> tuple[int, int]:
        """[low, high) of the timesteps this process draws from."""
        rank = distributed.rank() if self.rank is None else self.rank
        world_size = distributed.world_size() if self.world_size is None else self.world_size
        if not self.uniform_sampling or world_size < self.uniform_sampling_min_ranks:
            return 0, self.num_idx
        return timestep_interval(rank, world_size, self.num_idx, self.group_num)

    def __call__(self, n_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(alphas [n] float32, timesteps [n] int64), on the CPU."""
        low, high = self.interval()
        timesteps = torch.randint(low, high, (n_samples,), generator=generator)
        return self.alphas_cumprod_sqrt[timesteps], timesteps
