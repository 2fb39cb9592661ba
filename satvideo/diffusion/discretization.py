"""The zero-terminal-SNR DDPM noise schedule of CogVideoX.

Following the sgm convention of the official code, a noise level is described by
alpha = sqrt(alphas_cumprod): x_t = alpha * x_0 + sqrt(1 - alpha^2) * noise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from satvideo.config import ConfigError, instantiate_from_config


def scaled_linear_betas(beta_start: float, beta_end: float, num_timesteps: int) -> Tensor:
    """Betas whose square roots are evenly spaced (the "scaled linear" schedule), float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def shift_snr(alphas_cumprod: Tensor, shift_scale: float) -> Tensor:
    """Divide the signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) by shift_scale."""
    return alphas_cumprod / (shift_scale + (1 - shift_scale) * alphas_cumprod)


def rescale_to_zero_terminal_snr(alphas_cumprod_sqrt: Tensor) -> Tensor:
    """Shift sqrt(alphas_cumprod) so that the last is 0, then scale it so that the first is unchanged."""
    first, last = alphas_cumprod_sqrt[0], alphas_cumprod_sqrt[-1]
    return (alphas_cumprod_sqrt - last) * first / (first - last)


def linspace_timesteps(num_steps: int, num_timesteps: int) -> list[int]:
    """The raw timesteps a num_steps sampler visits, noisiest first, as the original picks them: num_steps values
    evenly spaced from num_timesteps - 1 down towards 0, truncated to integers."""
    return [int(t) for t in np.linspace(num_timesteps - 1, 0, num_steps, endpoint=False).astype(int)]


def trailing_timesteps(num_steps: int, num_timesteps: int) -> list[int]:
    """The raw timesteps a num_steps sampler visits, noisiest first, as diffusers' "trailing" spacing.

    Evaluated with numpy's arange exactly as diffusers does, so that values landing on .5 round alike;
    that arange yields one value too many for some step counts (61, 103, ...), hence the cut to num_steps.
    The two spacings agree at 22 step counts (10, 20, 25, 40, 50, 100 among them) and differ by one timestep at
    some steps of the others.
    """
    spaced = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[:num_steps]
    return [int(t) - 1 for t in spaced]


TIMESTEP_SPACINGS = {"linspace": linspace_timesteps, "trailing": trailing_timesteps}


class ZeroSNRDDPMDiscretization:
    """Scaled-linear DDPM betas, SNR divided by shift_scale, rescaled to zero terminal SNR.

    `alphas_cumprod_sqrt[t]` (float64, indexed by the raw timestep t) falls from about 0.9996 at t = 0 to
    exactly 0 at t = num_timesteps - 1. With `post_shift` the SNR shift is applied after the rescale rather
    than before; `keep_start` (pre-shift only) adjusts linear_start so that alphas_cumprod[0] is the same as
    without the shift. `timestep_spacing` chooses the timesteps a sampler visits: `linspace` as the original,
    `trailing` as diffusers' CogVideoX schedulers.
    """

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        num_timesteps: int = 1000,
        shift_scale: float = 1.0,
        keep_start: bool = False,
        post_shift: bool = False,
        timestep_spacing: str = "linspace",
    ):
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"discretization_config.params.timestep_spacing={timestep_spacing!r}: expected one of "
                              f"{', '.join(TIMESTEP_SPACINGS)}")
        self.spacing = TIMESTEP_SPACINGS[timestep_spacing]
        if keep_start and not post_shift:
            # the shift then maps alphas_cumprod[0] to 1 - (the given linear_start)
            linear_start = linear_start / (shift_scale + (1 - shift_scale) * linear_start)
        self.num_timesteps = num_timesteps
        alphas_cumprod = torch.cumprod(1 - scaled_linear_betas(linear_start, linear_end, num_timesteps), dim=0)
        if not post_shift:
            alphas_cumprod = shift_snr(alphas_cumprod, shift_scale)
        alphas_cumprod_sqrt = rescale_to_zero_terminal_snr(alphas_cumprod.sqrt())
        if post_shift:
            alphas_cumprod_sqrt = shift_snr(alphas_cumprod_sqrt**2, shift_scale).sqrt()
        self.alphas_cumprod_sqrt = alphas_cumprod_sqrt

    def timesteps(self, num_steps: int) -> list[int]:
        """Raw timesteps of a num_steps sampling run, noisiest (num_timesteps - 1) first."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        return self.spacing(num_steps, self.num_timesteps)


def timestep_alphas(discretization_config: dict, num_idx: int, do_append_zero: bool, flip: bool) -> Tensor:
    """The float32 alpha table [num_idx], indexed by raw timestep, of a discretization config.

    Takes the sgm table options so that official configs pass through; only their defaults
    (do_append_zero=False, flip=True) index the table by raw timestep, the others are refused.
    """
    if do_append_zero or not flip:
        raise ValueError("noise levels are indexed by raw timestep: do_append_zero must be False and flip True")
    discretization = instantiate_from_config(discretization_config)
    if num_idx != discretization.num_timesteps:
        raise ValueError(
            f"num_idx ({num_idx}) must equal the discretization's num_timesteps ({discretization.num_timesteps})"
        )
    return discretization.alphas_cumprod_sqrt.float()


def noise_std(alpha: Tensor) -> Tensor:
    """sigma = sqrt(1 - alpha^2): the noise std at signal level alpha on this variance-preserving schedule."""
    return (1 - alpha**2).sqrt()
