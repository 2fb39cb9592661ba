"""Positional information for video tokens: 3D sin-cos tables, 3D rotary embedding, learnable table.

Sin-cos tables and rotary frequencies are computed for the actual latent grid of each call (and cached), so
a model trained at one size samples at another; at the configured size they equal the official ones. The
learnable table of 5B-I2V is tied to its configured grid.
"""

from __future__ import annotations

import torch
from sat.model.base_model import BaseMixin, non_conflict
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sines then cosines over dim/2 geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_3d(dim: int, grid: tuple[int, int, int], interpolation: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """[(t h w), dim] table: a quarter of the channels for time, then half of the rest each for width and height.

    `interpolation` = (time, height, width) divisors of the positions (the 2B model uses 1.875 spatially).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for 3D sin-cos positions")
    t, h, w = grid
    time_interp, height_interp, width_interp = interpolation
    spatial_dim = dim // 4 * 3
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w) / height_interp  # [(h w)]
    cols = torch.arange(w, dtype=torch.float32).repeat(h) / width_interp  # [(h w)]
    spatial = torch.cat([sincos_1d(spatial_dim // 2, cols), sincos_1d(spatial_dim // 2, rows)], dim=1)  # [(h w), 3D/4]
    temporal = sincos_1d(dim // 4, torch.arange(t, dtype=torch.float32) / time_interp)  # [t, D/4]
    table = torch.cat([temporal[:, None].expand(t, h * w, -1), spatial[None].expand(t, -1, -1)], dim=-1)
    return table.reshape(t * h * w, dim).float()


class SinCos3DPositionMixin(BaseMixin):
    """Adds fixed 3D sin-cos positions to the video tokens (zeros for text): CogVideoX-2B."""

    def __init__(self, height: int, width: int, compressed_num_frames: int, hidden_size: int, text_length: int = 0,
                 height_interpolation: float = 1.0, width_interpolation: float = 1.0, time_interpolation: float = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.interpolation = (time_interpolation, height_interpolation, width_interpolation)
        self._tables: dict[tuple, torch.Tensor] = {}

    def table(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (grid, device, dtype)
        if key not in self._tables:
            with torch.inference_mode(False):  # a table first made under inference_mode must serve training too
                self._tables[key] = sincos_3d(self.hidden_size, grid, self.interpolation).to(device, dtype)
        return self._tables[key]

    def position_embedding_forward(self, position_ids, **kwargs):
        images, text_length = kwargs["images"], kwargs["text_length"]
        video = self.table(kwargs["grid_size"], images.device, images.dtype)
        text = video.new_zeros(text_length, self.hidden_size)
        return torch.cat([text, video], dim=0)[None]  # [1, L + N, D]

    def reinit(self, parent_model=None):
        del self.transformer.position_embeddings


def rotary_frequencies(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """[(t h w), head_dim] rotation angles: channels split t:h:w = 2:3:3, each frequency used by a channel pair."""
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3

    def axis_angles(length: int, dim: int) -> torch.Tensor:
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        return (torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]).repeat_interleave(2, dim=-1)

    t, h, w = grid
    angles = torch.cat([
        axis_angles(t, dim_t)[:, None, None].expand(t, h, w, -1),
        axis_angles(h, dim_hw)[None, :, None].expand(t, h, w, -1),
        axis_angles(w, dim_hw)[None, None, :].expand(t, h, w, -1),
    ], dim=-1)
    return angles.reshape(t * h * w, -1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dimension."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, N, head_dim]; cos/sin [N, head_dim]. Computed in fp32."""
    x32 = x.float()
    return (x32 * cos + rotate_pairs(x32) * sin).to(x.dtype)


class Rotary3DPositionMixin(BaseMixin):
    """3D rotary embedding of video queries and keys (CogVideoX-5B and 1.5), optionally plus a learnable table
    added to the input tokens (CogVideoX-5B-I2V)."""

    def __init__(self, height: int, width: int, compressed_num_frames: int, hidden_size: int, hidden_size_head: int,
                 text_length: int, theta: float = 10000.0, rot_v: bool = False, learnable_pos_embed: bool = False):
        super().__init__()
        self.head_dim, self.theta, self.rot_v = hidden_size_head, theta, rot_v
        self.learned_grid = (compressed_num_frames, height, width)
        if learnable_pos_embed:
            num_tokens = text_length + height * width * compressed_num_frames
            self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        else:
            self.pos_embedding = None
        self._angles: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.apply_rotary = apply_rotary  # compile_regions fuses it

    def compile_regions(self) -> None:
        """`args.compile`: the rotation of queries and keys as one fused kernel (static shapes)."""
        self.apply_rotary = torch.compile(apply_rotary, dynamic=False)

    def cos_sin(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, device)
        if key not in self._angles:
            with torch.inference_mode(False):  # as SinCos3DPositionMixin.table
                angles = rotary_frequencies(self.head_dim, grid, self.theta).to(device)
                self._angles[key] = (angles.cos(), angles.sin())
        return self._angles[key]

    def position_embedding_forward(self, position_ids, **kwargs):
        if self.pos_embedding is None:
            return None
        t, h, w = kwargs["grid_size"]
        if (h, w) != self.learned_grid[1:] or t > self.learned_grid[0]:
            raise ValueError(f"the learnable position table covers {self.learned_grid[0]} x {self.learned_grid[1]} x "
                             f"{self.learned_grid[2]} latent patches (t, h, w); this input has {t} x {h} x {w}")
        return self.pos_embedding[:, : kwargs["text_length"] + kwargs["seq_length"]].to(kwargs["images"].dtype)

    @non_conflict
    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                     log_attention_weights=None, scaling_attention_score=True, old_impl=None, **kwargs):
        text_length = kwargs["text_length"]
        cos, sin = self.cos_sin(kwargs["grid_size"], query_layer.device)

        def rotate_video_(x: torch.Tensor) -> None:
            # in place, no concatenation: the rotation's backward needs only cos and sin, not x
            x[:, :, text_length:] = self.apply_rotary(x[:, :, text_length:], cos, sin)

        for x in (query_layer, key_layer, value_layer) if self.rot_v else (query_layer, key_layer):
            rotate_video_(x)
        return old_impl(query_layer, key_layer, value_layer, attention_mask, attention_dropout=attention_dropout,
                        log_attention_weights=log_attention_weights, scaling_attention_score=scaling_attention_score,
                        **kwargs)

    def reinit(self, parent_model=None):
        del self.transformer.position_embeddings
