"""The training loss of a video diffusion model: weighted x0 error at a random discrete noise level."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from satvideo.config import instantiate_from_config
from satvideo.diffusion.denoiser import DiscreteDenoiser, append_dims
from satvideo.diffusion.discretization import noise_std

LOSS_TYPES = ("l2", "l1")


class VideoDiffusionLoss:
    """Per-sample loss [B] of one denoising step on latent videos x [B, T, C, H, W].

    x is noised to x * alpha + noise * sqrt(1 - alpha^2) at timesteps from the sigma sampler, and the
    denoiser's x0 estimate is compared with x under the weight denoiser.w(alpha); with EpsWeighting that
    weight is 1 / (1 - alpha^2), which makes the l2 loss the squared error of the network's v-prediction.
    The first `fixed_frames` latent frames are given to the network clean (conditioning frames, as the
    samplers' fixed_frames keep them) and left out of the loss. Keyword arguments of a call go to the
    network; `batch2model_keys` of official configs is accepted and not needed, since the engine passes them.
    """

    def __init__(
        self,
        sigma_sampler_config: dict,
        type: str = "l2",
        offset_noise_level: float = 0.0,
        batch2model_keys: str | list[str] | None = None,
        fixed_frames: int = 0,
    ):
        if type not in LOSS_TYPES:
            raise ValueError(f"loss type {type!r} is not one of {LOSS_TYPES}")
        self.sigma_sampler = instantiate_from_config(sigma_sampler_config)
        self.type = type
        self.offset_noise_level = offset_noise_level
        self.fixed_frames = fixed_frames

    def noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise, plus a per-sample constant offset when offset_noise_level > 0; from `generator`
        (drawn where it lives) when given, else from the global RNG on x's device."""
        if generator is None:
            noise = torch.randn_like(x)
        else:
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        if self.offset_noise_level > 0:
            offset = torch.randn(x.shape[0], generator=generator, device=generator.device if generator else x.device,
                                 dtype=x.dtype).to(x.device)
            noise = noise + self.offset_noise_level * append_dims(offset, x.ndim)
        return noise

    def __call__(
        self,
        network: Callable[..., Tensor],
        denoiser: DiscreteDenoiser,
        cond: dict,
        x: Tensor,
        generator: torch.Generator | None = None,
        **batch2model: Any,
    ) -> Tensor:
        """Per-sample losses [B]; `generator` (a CPU generator) fixes the timesteps and noise (validation)."""
        x = x.float()
        alpha, _ = self.sigma_sampler(x.shape[0], generator=generator)
        alpha = alpha.to(x.device)
        noised = append_dims(alpha, x.ndim) * x + append_dims(noise_std(alpha), x.ndim) * self.noise_like(x, generator)
        frames = self.fixed_frames
        noised[:, :frames] = x[:, :frames]
        x0 = denoiser(network, noised, alpha, cond, **batch2model)
        error = (x0 - x)[:, frames:]
        error = error.square() if self.type == "l2" else error.abs()
        return (append_dims(denoiser.w(alpha), x.ndim) * error).flatten(1).mean(dim=1)
