"""Building blocks of the CogVideoX VAE: resnet blocks, spatial norm, down/upsampling.

Frame 0 of a causal video stands alone (it is the 'image' frame), so every temporal resampling
treats an odd-length clip as frame 0 plus pairs of frames.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from satvideo.vae.causal_conv import CausalConv3d


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def check_no_attention(attn_resolutions: list[int]) -> None:
    if attn_resolutions:
        raise ValueError(f"attn_resolutions={list(attn_resolutions)}: the CogVideoX VAE has no attention blocks")


def split_leading_frame(x: Tensor) -> tuple[Tensor, Tensor]:
    """(frame 0, rest) for an odd number of frames, (empty, all) for an even number."""
    lead = x.shape[2] % 2
    return x[:, :, :lead], x[:, :, lead:]


def halve_time(x: Tensor) -> Tensor:
    """Average consecutive frame pairs, keeping an odd leading frame as is."""
    first, rest = split_leading_frame(x)
    return torch.cat([first, (rest[:, :, 0::2] + rest[:, :, 1::2]) / 2], dim=2)


def double_time(x: Tensor) -> Tensor:
    """Repeat every frame twice, except an odd leading frame."""
    first, rest = split_leading_frame(x)
    return torch.cat([first, rest.repeat_interleave(2, dim=2)], dim=2)


def per_frame(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame of x [B, C, T, H, W]."""
    frames = rearrange(x, "b c t h w -> (b t) c h w")
    return rearrange(layer(frames), "(b t) c h w -> b c t h w", b=x.shape[0])


def resize_latent_like(z: Tensor, h: Tensor) -> Tensor:
    """Nearest-resize z to h's (T, H, W); with odd T, latent frame 0 maps to frame 0 alone."""
    height, width = h.shape[-2:]
    if h.shape[2] % 2 == 1 and h.shape[2] > 1:
        first = F.interpolate(z[:, :, :1], size=(1, height, width))
        rest = F.interpolate(z[:, :, 1:], size=(h.shape[2] - 1, height, width))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(z, size=h.shape[-3:])


class SpatialNorm3d(nn.Module):
    """GroupNorm whose scale and shift are predicted from the latent z (decoder only)."""

    def __init__(self, channels: int, z_channels: int, groups: int):
        super().__init__()
        self.norm_layer = group_norm(channels, groups)
        self.conv_y = CausalConv3d(z_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(z_channels, channels, kernel_size=1)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        z = resize_latent_like(z, h)
        return self.norm_layer(h) * self.conv_y(z) + self.conv_b(z)


def normalize(norm: nn.Module, h: Tensor, z: Tensor | None) -> Tensor:
    return norm(h) if z is None else norm(h, z)


class ResnetBlock3d(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1-projected) skip.

    With `z_channels` the norms are spatial norms conditioned on the latent (decoder).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0,
                 z_channels: int | None = None):
        super().__init__()

        def make_norm(channels: int) -> nn.Module:
            return group_norm(channels, groups) if z_channels is None else SpatialNorm3d(channels, z_channels, groups)

        self.norm1 = make_norm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = make_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.nin_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(normalize(self.norm1, x, z)))
        h = self.conv2(self.dropout(F.silu(normalize(self.norm2, h, z))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class ResnetPair(nn.Module):
    """The two resnet blocks at the lowest resolution (`mid.block_1`, `mid.block_2`)."""

    def __init__(self, channels: int, groups: int, dropout: float, z_channels: int | None = None):
        super().__init__()
        self.block_1 = ResnetBlock3d(channels, channels, groups, dropout, z_channels)
        self.block_2 = ResnetBlock3d(channels, channels, groups, dropout, z_channels)

    def forward(self, h: Tensor, z: Tensor | None = None) -> Tensor:
        return self.block_2(self.block_1(h, z), z)


class Downsample3d(nn.Module):
    """Halve H and W with a strided conv; with `compress_time`, first average frame pairs."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.compress_time:
            x = halve_time(x)
        x = F.pad(x, (0, 1, 0, 1))  # asymmetric: right and bottom only
        return per_frame(self.conv, x)


class Upsample3d(nn.Module):
    """Double H and W (nearest) and smooth with a conv; with `compress_time`, also repeat frames."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2))
        if self.compress_time:
            x = double_time(x)
        return per_frame(self.conv, x)
