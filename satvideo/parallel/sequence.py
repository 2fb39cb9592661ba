"""Sequence parallelism for the transformer (DeepSpeed-Ulysses' scheme): one video's tokens over P ranks.

Each rank of a sequence-parallel group holds all text tokens and a contiguous 1/P of the video tokens (the first
N mod P ranks one more). Everything but attention works token by token, so it runs on the local share unchanged
(the expert LayerNorm still sees [text; video]). Around attention an all-to-all swaps the split: every rank then
holds the whole sequence for H/P of the heads, runs the usual attention chain on it (qk LayerNorm, 3D RoPE with
the full grid, SDPA) and a second all-to-all swaps back. Text queries, keys and values are the same on every rank,
so each rank takes its heads locally; their outputs are gathered over heads. Before the final layer the video
tokens are gathered, so every rank computes the same full output and loss.

Every collective has its exact adjoint in backward (all-to-all <-> all-to-all, all-gather <-> reduce-scatter), so
the gradient summed over the group's ranks is the gradient of their summed loss, P times the loss; DeepSpeed's
mean over all ranks (data x sequence) then gives the data-parallel mean gradient with no rescaling. The ranks of a
group must see the same batch, timesteps and noise (training/loop.py seeds them alike).

Heads must divide by P. The all-to-alls use torch.distributed (gloo on CPU, NCCL on GPU) with uneven token
splits, where DeepSpeed's `DistributedAttention` assumes equal ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from sat.model.base_model import BaseMixin, non_conflict


def split_sizes(total: int, parts: int) -> list[int]:
    """Contiguous shares of `total` tokens over `parts` ranks, the first total % parts ones a token longer."""
    return [total // parts + (rank < total % parts) for rank in range(parts)]


def _all_to_all(pieces: list[torch.Tensor], shapes: list[torch.Size], group) -> list[torch.Tensor]:
    """Send pieces[s] to rank s of `group`; receive from each rank s a tensor of shapes[s]. One flat
    all_to_all_single with split sizes, which (unlike list all_to_all on gloo) allows pieces of different sizes."""
    sent = torch.cat([piece.reshape(-1) for piece in pieces])
    received_sizes = [shape.numel() for shape in shapes]
    received = sent.new_empty(sum(received_sizes))
    dist.all_to_all_single(received, sent, received_sizes, [piece.numel() for piece in pieces], group=group)
    return [flat.view(shape) for flat, shape in zip(received.split(received_sizes), shapes)]


class _SwapSplit(torch.autograd.Function):
    """[B, H, n_r, d] (all heads, local tokens) <-> [B, H/P, N, d] (this rank's heads, all tokens); each direction's
    backward is the other."""

    @staticmethod
    def forward(ctx, x, group, sizes, to_sequence: bool):
        ctx.group, ctx.sizes, ctx.to_sequence = group, sizes, to_sequence
        return (heads_to_sequence_ if to_sequence else sequence_to_heads_)(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        inverse = sequence_to_heads_ if ctx.to_sequence else heads_to_sequence_
        return inverse(grad, ctx.group, ctx.sizes), None, None, None


def heads_to_sequence_(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    batch, heads, _, dim = x.shape
    parts = len(sizes)
    shapes = [torch.Size((batch, heads // parts, size, dim)) for size in sizes]
    return torch.cat(_all_to_all(list(x.chunk(parts, dim=1)), shapes, group), dim=2)


def sequence_to_heads_(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    batch, heads_local, _, dim = x.shape
    mine = sizes[dist.get_rank(group)]
    shapes = [torch.Size((batch, heads_local, mine, dim))] * len(sizes)
    return torch.cat(_all_to_all(list(x.split(sizes, dim=2)), shapes, group), dim=1)


class _GatherAlongDim(torch.autograd.Function):
    """All-gather of per-rank pieces along `dim` (sizes per rank); backward: the sum over ranks of the gradient,
    each rank keeping its own piece (a reduce-scatter, done as all-reduce + slice so that gloo can run it)."""

    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        longest = max(sizes)
        padded = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, longest - x.shape[dim]])
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(gathered, sizes)], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, sum(ctx.sizes[:rank]), ctx.sizes[rank]), None, None, None


def gather_along(x: torch.Tensor, group, dim: int, sizes: list[int]) -> torch.Tensor:
    return _GatherAlongDim.apply(x, group, dim, sizes)


class SequenceParallelMixin(BaseMixin):
    """Splits the video tokens over `group` (see the module docstring). Added last, so that its hooks wrap the
    others: it shares the tokens out after patch and position embedding, swaps the split around the whole attention
    chain, and gathers the video tokens before the final layer."""

    def __init__(self, group, num_heads: int):
        super().__init__()
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        if num_heads % self.size:
            raise ValueError(f"{num_heads} attention heads do not divide over {self.size} sequence-parallel ranks")
        self.sizes: list[int] = []

    def local_tokens(self, tokens: torch.Tensor, text_length: int) -> torch.Tensor:
        """[B, L + N, D] -> [B, L + n_r, D]: all text tokens and this rank's share of the video tokens."""
        self.sizes = split_sizes(tokens.shape[1] - text_length, self.size)
        start = text_length + sum(self.sizes[: self.rank])
        return torch.cat([tokens[:, :text_length], tokens[:, start:start + self.sizes[self.rank]]], dim=1)

    @non_conflict
    def word_embedding_forward(self, input_ids, old_impl=None, **kwargs):
        return self.local_tokens(old_impl(input_ids, **kwargs), kwargs["text_length"])

    @non_conflict
    def position_embedding_forward(self, position_ids, old_impl=None, **kwargs):
        table = old_impl(position_ids, **kwargs)  # [1, L + N, D] or None (RoPE acts inside attention)
        return None if table is None else self.local_tokens(table, kwargs["text_length"])

    @non_conflict
    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                     log_attention_weights=None, scaling_attention_score=True, old_impl=None, **kwargs):
        text_length = kwargs["text_length"]
        heads = slice(self.rank * query_layer.shape[1] // self.size, (self.rank + 1) * query_layer.shape[1] // self.size)

        def whole_sequence(x: torch.Tensor) -> torch.Tensor:  # [B, H, L + n_r, d] -> [B, H/P, L + N, d]
            video = _SwapSplit.apply(x[:, :, text_length:], self.group, self.sizes, True)
            return torch.cat([x[:, heads, :text_length], video], dim=2)

        out = old_impl(whole_sequence(query_layer), whole_sequence(key_layer), whole_sequence(value_layer),
                       attention_mask, attention_dropout=attention_dropout, log_attention_weights=log_attention_weights,
                       scaling_attention_score=scaling_attention_score, **kwargs)  # [B, H/P, L + N, d]
        text = gather_along(out[:, :, :text_length], self.group, 1, [out.shape[1]] * self.size)  # [B, H, L, d]
        video = _SwapSplit.apply(out[:, :, text_length:], self.group, self.sizes, False)  # [B, H, n_r, d]
        return torch.cat([text, video], dim=2)

    @non_conflict
    def final_forward(self, logits, old_impl=None, **kwargs):
        text_length = kwargs["text_length"]
        video = gather_along(logits[:, text_length:], self.group, 1, self.sizes)  # [B, N, D]
        return old_impl(torch.cat([logits[:, :text_length], video], dim=1), **kwargs)


def enable_sequence_parallel(network, group) -> None:
    """Split `network`'s video tokens over `group` from now on (a no-op for a group of one rank)."""
    if dist.get_world_size(group) > 1:
        heads = network.transformer.layers[0].attention.num_attention_heads
        network.add_mixin("sequence_parallel", SequenceParallelMixin(group, heads))
