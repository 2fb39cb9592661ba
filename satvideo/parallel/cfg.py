"""CFG-parallel denoising: the unconditional and conditional halves of a guided batch on the two ranks of a pair.

Classifier-free guidance evaluates the network on [uncond; cond] (diffusion/guiders.py). With a CFG group of two
ranks each evaluates one half (rank 0 the unconditional one) and the halves are gathered back, so both ranks hold
the whole output and step the sampler alike: the work per step halves, nothing else changes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def halve(value, batch: int, rank: int):
    """This rank's half of a tensor whose first dimension is the guided batch; anything else as it is."""
    if torch.is_tensor(value) and value.dim() and value.shape[0] == batch:
        return value.narrow(0, rank * batch // 2, batch // 2)
    if isinstance(value, dict):
        return {key: halve(item, batch, rank) for key, item in value.items()}
    return value


def evaluate_halves(network: Callable, group, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """network(x, *args, **kwargs) over a guided batch x [2B, ...], each rank of `group` computing one half."""
    batch, rank = x.shape[0], dist.get_rank(group)
    if batch % 2:
        return network(x, *args, **kwargs)  # not a guided batch (e.g. guidance scale 1)
    half = network(halve(x, batch, rank), *(halve(a, batch, rank) for a in args),
                   **{key: halve(value, batch, rank) for key, value in kwargs.items()})
    halves = [torch.empty_like(half) for _ in range(dist.get_world_size(group))]
    dist.all_gather(halves, half.contiguous(), group=group)
    return torch.cat(halves)
