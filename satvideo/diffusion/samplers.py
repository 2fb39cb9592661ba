"""Samplers for v-prediction on the zero-terminal-SNR discretization: DDIM and DPM-Solver++(2M).

A sampler is called as `sampler(denoiser, x, cond, uc, generator)` where x is the initial noise and
`denoiser(x, alpha [B], cond) -> x0` is the engine's closure around the DiscreteDenoiser. The run visits the
discretization's timesteps (the original's spacing, or diffusers' "trailing" one with `timestep_spacing: trailing`),
then steps to alpha = 1 where the state is the last x0 estimate.

Two differences from other implementations, on purpose:
- The alphas are those of the training table at the visited timesteps, as in diffusers; the official SAT
  code rescales the visited sub-schedule to zero SNR again (alphas off by up to 0.1% at 50 steps).
- Each step goes to the next visited timestep. diffusers steps to t - 1000 // num_steps instead, which is
  the same when num_steps divides 1000 (10, 20, 25, 50, ...) and a slightly different noise level otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from satvideo.config import ConfigError, check_value, instantiate_from_config, whole_rule
from satvideo.diffusion.discretization import noise_std

DenoiserFn = Callable[[Tensor, Tensor, dict], Tensor]
SAMPLER_KEY = "model.sampler_config.params"


Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Normal noise drawn where the generator lives (a seed gives the same noise on any device), then moved to
    `device`. A list of generators draws each sample of the batch from its own one."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def log_snr(alpha: Tensor) -> Tensor:
    """lambda = log(alpha / sigma): -inf at zero SNR, +inf at alpha = 1."""
    return alpha.log() - 0.5 * torch.log1p(-(alpha**2))


def dpmpp_2m_terms(x0: Tensor, x0_prev: Tensor | None, alphas: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """(h, x0 extrapolated) of the DPM-Solver++(2M) step from alphas[i] to alphas[i + 1], h in log-SNR.

    The run starts at zero SNR, so h is infinite at the first step (exp(-h) = 0: the update uses x0 alone)
    and h_prev at the second, where the extrapolation weight 1 / (2r), r = h_prev / h, is thus 0.
    """
    h = log_snr(alphas[i + 1]) - log_snr(alphas[i])
    if x0_prev is None:
        return h, x0
    weight = h / (2 * (log_snr(alphas[i]) - log_snr(alphas[i - 1])))
    return h, (1 + weight) * x0 - weight * x0_prev


class VideoDDIMSampler:
    """Deterministic DDIM: keeps the noise direction implied by x and the x0 estimate.

    `fixed_frames` > 0 keeps the first frames of x (known clean latents placed there by the caller) fixed
    throughout the run. With `verbose`, a tqdm bar counts the steps.
    """

    def __init__(
        self,
        num_steps: int,
        discretization_config: dict,
        guider_config: dict | None = None,
        verbose: bool = False,
        fixed_frames: int = 0,
    ):
        self.discretization = instantiate_from_config(discretization_config)
        check_value(f"{SAMPLER_KEY}.num_steps", num_steps, whole_rule(1, self.discretization.num_timesteps))
        self.num_steps = num_steps
        self.guider = instantiate_from_config(guider_config) if guider_config else None
        guider_steps = getattr(self.guider, "num_steps", num_steps)
        if guider_steps != num_steps:  # DynamicCFG's schedule is defined over the sampler's steps
            raise ConfigError(f"{SAMPLER_KEY}.guider_config.params.num_steps={guider_steps} differs from "
                              f"{SAMPLER_KEY}.num_steps={num_steps}; set both")
        self.verbose = verbose
        self.fixed_frames = fixed_frames

    def schedule(self) -> tuple[list[int], Tensor]:
        """Raw timesteps [n], noisiest first, and their alphas [n + 1] (float64) ending with alpha = 1."""
        timesteps = self.discretization.timesteps(self.num_steps)
        alphas = self.discretization.alphas_cumprod_sqrt[timesteps]
        return timesteps, torch.cat([alphas, alphas.new_ones(1)])

    def guides(self) -> bool:
        """Whether the unconditional pass (and so a negative prompt) changes the result at some step."""
        return self.guider is not None and any(self.guider.scale_at(t) != 1 for t in self.schedule()[0])

    def denoise(self, denoiser: DenoiserFn, x: Tensor, alpha: Tensor, timestep: int, cond: dict, uc: dict) -> Tensor:
        """The (guided) x0 estimate at one step."""
        alpha = alpha.float().to(x.device).expand(x.shape[0])
        if self.guider is None:
            return denoiser(x, alpha, cond).float()
        return self.guider(denoiser(*self.guider.prepare_inputs(x, alpha, cond, uc)).float(), timestep)

    def update(
        self, x: Tensor, x0: Tensor, x0_prev: Tensor | None, alphas: Tensor, i: int, generator: torch.Generator | None
    ) -> Tensor:
        """x at alphas[i + 1] from x at alphas[i] and the x0 estimate (x0_prev: the previous step's, or None)."""
        alpha, alpha_next = alphas[i], alphas[i + 1]
        ratio = noise_std(alpha_next) / noise_std(alpha)
        return ratio * x + (alpha_next - alpha * ratio) * x0

    def __call__(
        self,
        denoiser: DenoiserFn,
        x: Tensor,
        cond: dict,
        uc: dict | None = None,
        generator: torch.Generator | None = None,
        start: int = 0,
        fixed_frames: int | None = None,
    ) -> Tensor:
        """Denoise x, which is at the noise level of step `start` (0: pure noise; video-to-video starts later).

        `fixed_frames` (default: the sampler's) first latent frames of x stay as given (continuation).
        """
        timesteps, alphas = self.schedule()
        uc = cond if uc is None else uc
        fixed = self.fixed_frames if fixed_frames is None else fixed_frames
        prefix = x[:, :fixed].clone()
        x0_prev = None
        steps = tqdm(range(start, len(timesteps)), desc=type(self).__name__, disable=not self.verbose)
        for i in steps:
            x = torch.cat([prefix, x[:, fixed:]], dim=1)
            x0 = self.denoise(denoiser, x, alphas[i], timesteps[i], cond, uc)
            # the last step reaches alpha = 1, where the state is the x0 estimate itself
            x = x0 if i == len(timesteps) - 1 else self.update(x, x0, x0_prev, alphas, i, generator)
            x0_prev = x0
        return torch.cat([prefix, x[:, fixed:]], dim=1)


class VPODEDPMPP2MSampler(VideoDDIMSampler):
    """DPM-Solver++(2M), deterministic (probability-flow ODE) form, in log-SNR steps h."""

    def update(
        self, x: Tensor, x0: Tensor, x0_prev: Tensor | None, alphas: Tensor, i: int, generator: torch.Generator | None
    ) -> Tensor:
        alpha, alpha_next = alphas[i], alphas[i + 1]
        h, x0 = dpmpp_2m_terms(x0, x0_prev, alphas, i)
        return noise_std(alpha_next) / noise_std(alpha) * x - alpha_next * torch.expm1(-h) * x0


class VPSDEDPMPP2MSampler(VideoDDIMSampler):
    """DPM-Solver++(2M) SDE: the ODE step with part of the noise replaced by fresh noise from `generator`.

    One normal draw per step except the last. (diffusers' step and the official code draw a second,
    discarded normal before each second-order update, so the same seed gives them a different noise stream.)
    """

    def update(
        self, x: Tensor, x0: Tensor, x0_prev: Tensor | None, alphas: Tensor, i: int, generator: torch.Generator | None
    ) -> Tensor:
        alpha, alpha_next = alphas[i], alphas[i + 1]
        h, x0 = dpmpp_2m_terms(x0, x0_prev, alphas, i)
        sigma, sigma_next = noise_std(alpha), noise_std(alpha_next)
        noise = randn(x.shape, generator, x.device, x.dtype)
        return (
            sigma_next / sigma * torch.exp(-h) * x
            - alpha_next * torch.expm1(-2 * h) * x0
            + sigma_next * (-torch.expm1(-2 * h)).sqrt() * noise
        )
