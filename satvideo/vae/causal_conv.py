"""Causal 3D convolution and chunk-wise streaming along the time axis."""
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

# (conv, its input x, the past frames it would use) -> the past frames to use instead
PastSource = Callable[["CausalConv3d", Tensor, Tensor], Tensor]


class CausalConv3d(nn.Module):
    """Conv3d whose output frame t sees only input frames <= t.

    Time is padded on the left with `kernel_size - 1` past frames (`past_frames`), space with zeros
    so that H and W are kept. The past frames are copies of the first frame; inside `streaming(...)`
    the last `kernel_size - 1` input frames of a call replace them in the next call, so a video can
    be processed in consecutive time chunks; a `past_source` (the previous rank's frames in
    satvideo.parallel.context_vae) may replace either.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_pad = kernel_size - 1
        space_pad = kernel_size // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, space_pad, space_pad))
        self.streaming = False
        self.cache: Tensor | None = None
        self.past_source: PastSource | None = None

    def past_frames(self, x: Tensor) -> Tensor:
        """The `time_pad` frames [B, C, time_pad, H, W] before x: the streaming cache, else copies of the
        first frame, unless `past_source` replaces them."""
        past = self.cache if self.cache is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        return past if self.past_source is None else self.past_source(self, x, past)

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad > 0:
            x = torch.cat([self.past_frames(x), x], dim=2)  # [B, C, time_pad + T, H, W]
            if self.streaming:  # a copy: a view would keep this call's whole padded input alive until the next
                self.cache = x[:, :, -self.time_pad :].clone()
        return self.conv(x)


def causal_convs(module: nn.Module) -> list[CausalConv3d]:
    """The causal convs of `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, CausalConv3d)]


@contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Let every causal conv in `module` carry its last frames from one call to the next."""
    convs = causal_convs(module)
    for conv in convs:
        conv.streaming, conv.cache = True, None
    try:
        yield
    finally:
        for conv in convs:
            conv.streaming, conv.cache = False, None


def time_chunks(num_frames: int, chunk_frames: int) -> list[slice]:
    """Split [0, num_frames) into chunks of `chunk_frames`; the first chunk also takes the remainder.

    Putting the remainder first keeps the odd leading frame of a causal video (4k+1 frames,
    k+1 latents) in the first chunk, so every later chunk has an even length.
    """
    first = min(num_frames, chunk_frames + num_frames % chunk_frames)
    return [slice(0, first)] + [slice(s, s + chunk_frames) for s in range(first, num_frames, chunk_frames)]


def stream_over_time(module: nn.Module, x: Tensor, chunk_frames: int) -> Tensor:
    """Run `module` over x [B, C, T, H, W] chunk by chunk along T, with the causal conv cache."""
    with streaming(module):
        return torch.cat([module(x[:, :, chunk]) for chunk in time_chunks(x.shape[2], chunk_frames)], dim=2)
