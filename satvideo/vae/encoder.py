"""VAE encoder: video [B, C, T, H, W] -> Gaussian moments [B, 2 * z_channels, T', H', W']."""
import math

import torch.nn.functional as F
from torch import Tensor, nn

from satvideo.vae.blocks import Downsample3d, ResnetBlock3d, ResnetPair, check_no_attention, group_norm
from satvideo.vae.causal_conv import CausalConv3d


class EncoderLevel(nn.Module):
    """Resnet blocks at one resolution, then an optional downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, dropout: float,
                 downsample: Downsample3d | None):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock3d(c_in, c_out, groups, dropout) for c_in, c_out in zip(channels, channels[1:])
        )
        self.downsample = downsample

    def forward(self, h: Tensor) -> Tensor:
        for block in self.block:
            h = block(h)
        return h if self.downsample is None else self.downsample(h)


class ContextParallelEncoder3D(nn.Module):
    """CogVideoX 3D causal encoder (official config name; context parallelism is not used).

    Level i has `num_res_blocks` resnets with `ch * ch_mult[i]` channels; every level but the last
    halves H and W, and the first log2(`temporal_compress_times`) levels also halve time.
    `norm_groups` (not an official param; 32 there) lets tiny widths use fewer GroupNorm groups.
    Official params without effect here are listed in `satvideo.config.OFFICIAL_KEYS_WITHOUT_EFFECT`.
    """

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 double_z: bool = True, dropout: float = 0.0, attn_resolutions: list[int] = (),
                 temporal_compress_times: int = 4, norm_groups: int = 32):
        super().__init__()
        check_no_attention(attn_resolutions)
        self.temporal_compress_times = temporal_compress_times
        time_levels = int(math.log2(temporal_compress_times))
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1

        self.conv_in = CausalConv3d(in_channels, ch)
        self.down = nn.ModuleList(
            EncoderLevel(widths[i], widths[i + 1], num_res_blocks, norm_groups, dropout,
                         Downsample3d(widths[i + 1], compress_time=i < time_levels) if i < last else None)
            for i in range(len(ch_mult))
        )
        self.mid = ResnetPair(widths[-1], norm_groups, dropout)
        self.norm_out = group_norm(widths[-1], norm_groups)
        self.conv_out = CausalConv3d(widths[-1], 2 * z_channels if double_z else z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))
