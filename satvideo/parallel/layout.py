"""How the ranks of a job divide the work: data parallel x CFG parallel x sequence parallel.

Rank = (data_rank * cfg_size + cfg_rank) * sequence_size + sequence_rank: the ranks of a sequence-parallel group
are neighbours (one node, where all-to-all is fastest), then the two halves of a CFG-parallel pair, then data
parallel replicas. Ranks of one sequence group (and of one CFG pair) work on the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from satvideo.config import ConfigError


@dataclass
class Layout:
    data_rank: int = 0
    data_size: int = 1
    cfg_rank: int = 0
    cfg_size: int = 1
    sequence_rank: int = 0
    sequence_size: int = 1
    sequence_group: object = None  # a torch.distributed group; None when sequence_size is 1
    cfg_group: object = None

    @property
    def leads_its_group(self) -> bool:
        """The rank that writes what its sequence/CFG group computed together."""
        return self.sequence_rank == 0 and self.cfg_rank == 0


def build_layout(sequence_size: int = 1, cfg_size: int = 1, heads: int | None = None) -> Layout:
    """This rank's place in the job (every rank calls it: creating groups is collective). The sizes themselves are
    checked when the config loads (config.ARGS_RULES); here, that they divide the ranks and the model's `heads`
    (each rank of a sequence-parallel group attends with a whole share of them), before any weight loads."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_replica = sequence_size * cfg_size
    if world % per_replica:
        raise ConfigError(f"{world} ranks do not divide into groups of args.sequence_parallel_size={sequence_size} "
                          f"x args.cfg_parallel_size={cfg_size}")
    if heads is not None and heads % sequence_size:
        raise ConfigError(f"args.sequence_parallel_size={sequence_size} does not divide "
                          f"model.network_config.params.num_attention_heads={heads}: each rank of a sequence-parallel "
                          "group attends with an equal share of the heads")
    layout = Layout(data_rank=rank // per_replica, data_size=world // per_replica,
                    cfg_rank=rank // sequence_size % cfg_size, cfg_size=cfg_size,
                    sequence_rank=rank % sequence_size, sequence_size=sequence_size)
    if sequence_size > 1:
        for start in range(0, world, sequence_size):
            group = dist.new_group(list(range(start, start + sequence_size)))
            if start <= rank < start + sequence_size:
                layout.sequence_group = group
    if cfg_size > 1:
        for replica in range(world // per_replica):
            for sequence_rank in range(sequence_size):
                members = [replica * per_replica + cfg * sequence_size + sequence_rank for cfg in range(cfg_size)]
                group = dist.new_group(members)
                if rank in members:
                    layout.cfg_group = group
    return layout
