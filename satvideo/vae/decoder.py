"""VAE decoder: latent z [B, z_channels, T', H', W'] -> video [B, out_ch, T, H, W]."""
import math

import torch.nn.functional as F
from torch import Tensor, nn

from satvideo.vae.blocks import ResnetBlock3d, ResnetPair, SpatialNorm3d, Upsample3d, check_no_attention
from satvideo.vae.causal_conv import CausalConv3d


class DecoderLevel(nn.Module):
    """Latent-conditioned resnet blocks at one resolution, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, dropout: float,
                 z_channels: int, upsample: Upsample3d | None):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock3d(c_in, c_out, groups, dropout, z_channels) for c_in, c_out in zip(channels, channels[1:])
        )
        self.upsample = upsample

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        for block in self.block:
            h = block(h, z)
        return h if self.upsample is None else self.upsample(h)


class ContextParallelDecoder3D(nn.Module):
    """CogVideoX 3D causal decoder (official config name; context parallelism is not used).

    `up[i]` mirrors encoder level i (`num_res_blocks + 1` resnets with `ch * ch_mult[i]` channels)
    and runs from the deepest level up; the deepest log2(`temporal_compress_times`) upsamples also
    double time. Every norm is a spatial norm conditioned on z. `norm_groups` (not an official
    param; 32 there) lets tiny widths use fewer GroupNorm groups. Official params without effect
    here are listed in `satvideo.config.OFFICIAL_KEYS_WITHOUT_EFFECT`.
    """

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, out_ch: int = 3,
                 dropout: float = 0.0, attn_resolutions: list[int] = (), temporal_compress_times: int = 4,
                 norm_groups: int = 32):
        super().__init__()
        check_no_attention(attn_resolutions)
        num_levels = len(ch_mult)
        first_time_level = num_levels - int(math.log2(temporal_compress_times))
        widths = [ch * m for m in ch_mult] + [ch * ch_mult[-1]]  # widths[i + 1] feeds level i

        self.conv_in = CausalConv3d(z_channels, widths[-1])
        self.mid = ResnetPair(widths[-1], norm_groups, dropout, z_channels)
        self.up = nn.ModuleList(
            DecoderLevel(widths[i + 1], widths[i], num_res_blocks + 1, norm_groups, dropout, z_channels,
                         Upsample3d(widths[i], compress_time=i >= first_time_level) if i > 0 else None)
            for i in range(num_levels)
        )
        self.norm_out = SpatialNorm3d(widths[0], z_channels, norm_groups)
        self.conv_out = CausalConv3d(widths[0], out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z), z)
        for level in reversed(self.up):
            h = level(h, z)
        return self.conv_out(F.silu(self.norm_out(h, z)))
