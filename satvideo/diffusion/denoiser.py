"""The denoiser: turns a network's v-prediction at a discrete noise level into an estimate of x0."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from satvideo.config import instantiate_from_config
from satvideo.diffusion.discretization import noise_std, timestep_alphas


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ndim dimensions, to broadcast per-sample values over a batch."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class VideoScaling:
    """v-prediction preconditioning: x0 = alpha * x_t - sqrt(1 - alpha^2) * v, the network sees the timestep."""

    def __call__(self, alpha: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample (c_skip, c_out, c_in, c_noise) for alpha [B] at integer timesteps [B]."""
        return alpha, -noise_std(alpha), torch.ones_like(alpha), timestep


class EpsWeighting:
    """Loss weight 1 / sigma^2 (sigma the noise std); for v-prediction it turns the x0 error into the v error."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return sigma**-2.0


class DiscreteDenoiser(nn.Module):
    """x0 estimate network(x * c_in, timestep, cond) * c_out + x * c_skip on a discrete schedule.

    The noise level alpha [B] is snapped to the nearest entry of the discretization's table, whose index is
    the integer timestep (int64) the network embeds. `quantize_c_noise` is accepted for config compatibility
    only: the network always gets the integer timestep, as with the official configs' quantize_c_noise=False.
    """

    def __init__(
        self,
        num_idx: int,
        discretization_config: dict,
        scaling_config: dict,
        weighting_config: dict | None = None,
        do_append_zero: bool = False,
        quantize_c_noise: bool = True,
        flip: bool = True,
    ):
        super().__init__()
        # a plain attribute, not a buffer: it must not appear in checkpoints
        self.alphas_cumprod_sqrt = timestep_alphas(discretization_config, num_idx, do_append_zero, flip)
        self._tables_by_device: dict[torch.device, Tensor] = {}
        self.scaling = instantiate_from_config(scaling_config)
        self.weighting = instantiate_from_config(weighting_config) if weighting_config else EpsWeighting()

    def table_on(self, device: torch.device) -> Tensor:
        """The alpha table on `device`, copied there once."""
        if device not in self._tables_by_device:
            self._tables_by_device[device] = self.alphas_cumprod_sqrt.to(device)
        return self._tables_by_device[device]

    def timestep_of(self, alpha: Tensor) -> Tensor:
        """The timesteps [B] (int64) whose table alphas are nearest to alpha [B]."""
        table = self.table_on(alpha.device)
        return (alpha.float()[:, None] - table[None, :]).abs().argmin(dim=1)

    def w(self, alpha: Tensor) -> Tensor:
        """Per-sample loss weight [B] at noise levels alpha [B]."""
        return self.weighting(noise_std(alpha.float()))

    def forward(
        self, network: Callable[..., Tensor], x: Tensor, alpha: Tensor, cond: dict, **kwargs: Any
    ) -> Tensor:
        timestep = self.timestep_of(alpha)
        alpha = self.table_on(x.device)[timestep]
        c_skip, c_out, c_in, c_noise = self.scaling(alpha, timestep)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
        return network(x * c_in, c_noise, cond, **kwargs) * c_out + x * c_skip
