"""An exponential moving average of the trainable weights, on any optimizer, CPU or GPU.

    ema <- decay * ema + (1 - decay) * weight        after every optimizer step that was not skipped

The average is kept in fp32 and sharded over the data-parallel ranks: under ZeRO-3 each rank averages its own
partition of every weight (`ds_tensor`); otherwise each weight is averaged by one rank, weights assigned to ranks
largest first to balance memory. For exact resume each rank saves its shard beside the checkpoint
(`{save}/{iteration}/ema_rank{r}.pt`); for sampling rank 0 also writes the whole average in the SAT layout,
`{save}/{iteration}-ema/mp_rank_00_model_states.pt`, in the network's dtype (`args.use_ema` loads it).
`swapped_in` puts the average into the network for a while (validation with `args.validate_ema`) and then gives the
trained weights back bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from satvideo import distributed
from satvideo.checkpoint import MODEL_STATES, NETWORK_PREFIX, safe_load
from satvideo.config import CheckpointError


def shard_file(iteration_dir: Path, rank: int) -> Path:
    return iteration_dir / f"ema_rank{rank}.pt"


class EMA:
    def __init__(self, network: torch.nn.Module, decay: float):
        self.decay = decay
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.named = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
        self.partitioned = any(hasattr(p, "ds_tensor") for _, p in self.named)  # ZeRO-3
        self.owner = self.assign_owners()
        self.average = {name: self.local(p).detach().float().clone() for name, p in self.named
                        if self.owner[name] in (self.rank, None)}

    def assign_owners(self) -> dict[str, int | None]:
        """name -> the rank that averages it (None: every rank, its own partition)."""
        if self.partitioned:
            return {name: None for name, _ in self.named}
        load, owner = [0] * self.world_size, {}
        for name, parameter in sorted(self.named, key=lambda item: -item[1].numel()):
            rank = load.index(min(load))
            owner[name], load[rank] = rank, load[rank] + parameter.numel()
        return owner

    @staticmethod
    def local(parameter: torch.Tensor) -> torch.Tensor:
        return getattr(parameter, "ds_tensor", parameter)

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter in self.named:
            if name in self.average:
                self.average[name].lerp_(self.local(parameter).float(), 1.0 - self.decay)

    # --- files ---------------------------------------------------------------------------------------------

    def save_shard(self, iteration_dir: Path) -> None:
        torch.save({"decay": self.decay, "world_size": self.world_size, "average": self.average},
                   shard_file(iteration_dir, self.rank))

    def load_shard(self, iteration_dir: Path) -> None:
        file = shard_file(iteration_dir, self.rank)
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint was saved without args.ema_decay")
        state = safe_load(file)
        if state["world_size"] != self.world_size or state["average"].keys() != self.average.keys():
            raise CheckpointError(f"{file}: the EMA was sharded over {state['world_size']} ranks for other weights; "
                                  f"resume with the same number of ranks ({state['world_size']})")
        for name, tensor in state["average"].items():
            self.average[name].copy_(tensor)

    @torch.no_grad()
    def export(self, iteration_dir: Path) -> None:
        """Gather the whole average (every rank takes part) and write it on rank 0 in the SAT layout."""
        weights = {}
        for name, parameter in self.named:
            full = self.gather(name, parameter)
            if self.rank == 0:
                weights[NETWORK_PREFIX + name] = full.to(parameter.dtype).cpu()
        if self.rank == 0:
            folder = iteration_dir.parent / f"{iteration_dir.name}-ema"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"module": weights, "ema_decay": self.decay}, folder / MODEL_STATES)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the network's trainable weights for the duration; every rank takes part. Rank 0 keeps the
        trained weights on the CPU meanwhile and hands them back to every rank afterwards, so training goes on
        exactly as without the swap (one copy of the trainable weights in rank 0's memory, none on the GPUs). When
        the block raises, the weights are not given back: that needs every rank, and the run is stopping."""
        trained = {}
        with torch.no_grad():
            for name, parameter in self.named:
                average = self.gather(name, parameter)
                with self.whole(parameter):
                    if self.rank == 0:
                        trained[name] = parameter.data.to("cpu", copy=True)
                    parameter.data.copy_(average)
        yield
        with torch.no_grad():
            for name, parameter in self.named:
                with self.whole(parameter):
                    if self.rank == 0:
                        parameter.data.copy_(trained.pop(name))
                    if not self.partitioned and self.world_size > 1:  # ZeRO-3 broadcasts on leaving `whole`
                        dist.broadcast(parameter.data, src=0)

    def whole(self, parameter: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context in which `parameter.data` is the whole weight and what rank 0 writes into it reaches every rank's
        partition on leaving (ZeRO-3); without partitions the weight is whole already."""
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([parameter], modifier_rank=0)

    def gather(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        if self.partitioned:  # every rank holds an equal-size slice of the flat, padded weight
            pieces = [torch.empty_like(self.average[name]) for _ in range(self.world_size)]
            if self.world_size > 1:
                dist.all_gather(pieces, self.average[name])
            else:
                pieces = [self.average[name]]
            return torch.cat(pieces)[: parameter.ds_numel].view(parameter.ds_shape)
        if self.world_size == 1:
            return self.average[name]
        owner = self.owner[name]
        tensor = self.average[name] if owner == self.rank else torch.empty(parameter.shape, dtype=torch.float32,
                                                                              device=parameter.device)
        dist.broadcast(tensor, src=owner)
        return tensor
