"""Context-parallel VAE: one video's decode (latent time axis) or encode (frame axis) over the ranks of a group.

The time axis is cut as chunked decoding and encoding cut it (`time_chunks`: the first chunk also takes the
remainder, every later one has `chunk_frames` frames), and the chunks run in rounds of P, the group's size: in
round j, rank r runs the decoder (or encoder) on chunk j * P + r, all ranks in lockstep. Each causal conv of rank r
pads time with the last `time_pad` input frames of the same conv on rank r - 1, received point to point, and sends
its own last `time_pad` input frames to rank r + 1 (before the halo arrives when its chunk is long enough, else
after, since they then include received frames). Rank 0 pads with its first frame in the first round and, in
later rounds, with the streaming caches that rank P - 1 hands it at the end of the previous round (its chunk came
just before). Each rank then holds what `stream_over_time` would have computed for its chunks, and an all-gather
gives every rank the whole result. `chunk_frames=None` takes the longest chunks that still give each rank one:
a single round where the frame count allows it (13 latent frames on 2 ranks: 7 + 6), else a second, partial one.

The result equals one rank's `vae.decode(z, chunk_frames=c)` / `vae.encode(x, chunk_frames=c)` with the same c:
GroupNorm statistics are per chunk in both, so it differs from one-pass decoding (`chunk_frames=None`) exactly as
chunked decoding does. The original's `gather_norm` instead all-gathered each GroupNorm's input over the ranks
(`ContextParallelGroupNorm`) to normalise a round as one chunk; that is not implemented (an all-reduce of the
per-group sums and squares would give the same statistics for much less traffic). Inference only: no gradient
crosses the ranks. Point-to-point calls keep one order per pair of ranks, which NCCL needs as well as gloo.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from satvideo.parallel.sequence import gather_along
from satvideo.vae.autoencoder import LATENT_CHUNK_MULTIPLE, VideoAutoencoder, check_chunk_frames
from satvideo.vae.causal_conv import CausalConv3d, causal_convs, streaming, time_chunks


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank that point-to-point calls and broadcast take (torch < 2.6 knows no group ranks there)."""
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, group_rank)


class NeighbourFrames:
    """Past frames for the causal convs of a module that the ranks of `group` run in lockstep, each on its own
    chunk: rank r takes them from rank r - 1 and sends its own to rank r + 1 (a `PastSource`)."""

    def __init__(self, group: dist.ProcessGroup | None, convs: list[CausalConv3d]):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.convs = convs
        self.send_next = False
        self.sending: list[tuple[dist.Work, Tensor]] = []  # the frames must outlive their send

    def start_round(self, chunks: int) -> None:
        """A round of `chunks` chunks (at most one per rank) begins."""
        self.send_next = self.rank + 1 < chunks

    def __call__(self, conv: CausalConv3d, x: Tensor, past: Tensor) -> Tensor:
        self.wait_sends()
        own_frames = x.shape[2] >= conv.time_pad  # the frames to send are x's own, known before the halo
        if self.send_next and own_frames:
            self.send(x[:, :, -conv.time_pad :])
        if self.rank > 0:
            past = past.new_empty(past.shape)
            dist.recv(past, global_rank(self.group, self.rank - 1), group=self.group)
        if self.send_next and not own_frames:
            self.send(torch.cat([past, x], dim=2)[:, :, -conv.time_pad :])
        return past

    def send(self, frames: Tensor) -> None:
        frames = frames.contiguous()
        self.sending.append((dist.isend(frames, global_rank(self.group, self.rank + 1), group=self.group), frames))

    def wait_sends(self) -> None:
        for work, _ in self.sending:
            work.wait()
        self.sending.clear()

    def end_round(self, more_rounds: bool) -> None:
        self.wait_sends()
        if more_rounds and self.size > 1:
            self.hand_over()

    def hand_over(self) -> None:
        """Rank P - 1's streaming caches become rank 0's (with one rank they already are)."""
        last = self.size - 1
        convs = [conv for conv in self.convs if conv.cache is not None]
        if self.rank == last:
            works = [dist.isend(conv.cache, global_rank(self.group, 0), group=self.group) for conv in convs]
        elif self.rank == 0:
            for conv in convs:
                conv.cache = conv.cache.new_empty(conv.cache.shape)
            works = [dist.irecv(conv.cache, global_rank(self.group, last), group=self.group) for conv in convs]
        else:
            return
        for work in works:
            work.wait()


@contextmanager
def context_parallel(module: nn.Module, group: dist.ProcessGroup | None) -> Iterator[NeighbourFrames]:
    """Switch the causal convs of `module` to streaming with their past frames from the previous rank of `group`;
    the caller brackets each round of chunks with the yielded object's `start_round` and `end_round`."""
    convs = causal_convs(module)
    neighbours = NeighbourFrames(group, convs)
    with streaming(module):
        for conv in convs:
            conv.past_source = neighbours
        try:
            yield neighbours
        finally:
            for conv in convs:
                conv.past_source = None


def default_chunk_frames(num_frames: int, multiple: int, ranks: int) -> int:
    """The longest chunks (a multiple of `multiple` frames) that still give each of `ranks` ranks one; 0 when
    there are fewer than `ranks * multiple` frames."""
    return multiple * (num_frames // (ranks * multiple))


def gives_every_rank_a_chunk(num_frames: int, chunk_frames: int | None, group: dist.ProcessGroup | None) -> bool:
    """Whether `group` (None: no group) can share a chunked pass over `num_frames` frames: `chunk_frames` set and
    at least one of its chunks per rank (else the caller runs the pass on every rank, with the same result)."""
    return group is not None and chunk_frames is not None and \
        len(time_chunks(num_frames, chunk_frames)) >= dist.get_world_size(group)


def context_chunks(num_frames: int, multiple: int, ranks: int, chunk_frames: int | None, unit: str) -> list[slice]:
    """`time_chunks(num_frames, chunk_frames)`, at least one per rank (chunk_frames None: `default_chunk_frames`)."""
    if chunk_frames is None:
        chunk_frames = default_chunk_frames(num_frames, multiple, ranks)
        if chunk_frames == 0:
            raise ValueError(f"{num_frames} {unit} are too few to split over {ranks} context-parallel ranks: "
                             f"at least {ranks * multiple} are needed")
    check_chunk_frames(chunk_frames, multiple)
    chunks = time_chunks(num_frames, chunk_frames)
    if len(chunks) < ranks:
        raise ValueError(f"chunk_frames={chunk_frames} splits {num_frames} {unit} into {len(chunks)} chunks, fewer "
                         f"than the {ranks} context-parallel ranks")
    return chunks


def run_context_parallel(module: nn.Module, x: Tensor, chunks: list[slice], group: dist.ProcessGroup | None) -> Tensor:
    """`module` over the time `chunks` of x [B, C, T, H, W], P chunks a round; every rank gets the whole output."""
    size = dist.get_world_size(group)
    rounds = [chunks[start : start + size] for start in range(0, len(chunks), size)]
    outputs = []
    with context_parallel(module, group) as neighbours:
        for index, round_chunks in enumerate(rounds):
            neighbours.start_round(len(round_chunks))
            if neighbours.rank < len(round_chunks):
                outputs.append(module(x[:, :, round_chunks[neighbours.rank]]))
            neighbours.end_round(more_rounds=index + 1 < len(rounds))
    return gather_rounds(outputs, len(rounds), group)


def gather_rounds(outputs: list[Tensor], rounds: int, group: dist.ProcessGroup | None) -> Tensor:
    """This rank's outputs [B, C, t, H, W], one per round it had a chunk in -> every rank's, in chunk order."""
    size = dist.get_world_size(group)
    lengths = torch.zeros(rounds, dtype=torch.long, device=outputs[0].device)
    lengths[: len(outputs)] = torch.tensor([output.shape[2] for output in outputs])
    lengths = gather_along(lengths, group, 0, [rounds] * size).view(size, rounds).tolist()  # [rank][round]
    pieces = gather_along(torch.cat(outputs, dim=2), group, 2, [sum(row) for row in lengths])  # rank by rank
    by_rank = pieces.split([length for row in lengths for length in row], dim=2)  # (rank, round) order
    return torch.cat([by_rank[rank * rounds + index] for index in range(rounds) for rank in range(size)], dim=2)


@torch.no_grad()
def decode_context_parallel(vae: VideoAutoencoder, z: Tensor, group: dist.ProcessGroup | None,
                            chunk_frames: int | None = None) -> Tensor:
    """`vae.decode(z, chunk_frames)` with the latent chunks over the ranks of `group` (None: the default group),
    each rank holding the whole latent z [B, C, T', h, w]; every rank gets the whole video."""
    chunks = context_chunks(z.shape[2], LATENT_CHUNK_MULTIPLE, dist.get_world_size(group), chunk_frames,
                            "latent frames")
    return run_context_parallel(vae.decoder, z, chunks, group)


@torch.no_grad()
def encode_context_parallel(vae: VideoAutoencoder, x: Tensor, group: dist.ProcessGroup | None,
                            sample: bool | None = None, chunk_frames: int | None = None) -> Tensor:
    """`vae.encode(x, sample, chunk_frames)` with the frame chunks over the ranks of `group` (None: the default
    group), each rank holding the whole video x [B, 3, T, H, W]; every rank gets the latent of the group's first
    rank (one posterior draw for all)."""
    chunks = context_chunks(x.shape[2], vae.encoder.temporal_compress_times, dist.get_world_size(group),
                            chunk_frames, "frames")
    latent = vae.regularization(run_context_parallel(vae.encoder, x, chunks, group), sample=sample).contiguous()
    dist.broadcast(latent, global_rank(group, 0), group=group)
    return latent
