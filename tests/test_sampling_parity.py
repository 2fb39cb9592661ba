"""Parity with diffusers' CogVideoX schedulers: noise tables, timestep spacing and 10-step sampling runs.

The diffusers side replicates the denoising loop of CogVideoXPipeline (dynamic CFG on the v-prediction,
`scheduler.step`, and for DPM the `old_pred_original_sample` hand-over); ours is built from the official
SAT config targets. Both drive the same stand-in transformer from the same initial noise.
"""

import itertools
import math

import diffusers.schedulers.scheduling_dpm_cogvideox as dpm_module
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from satvideo.config import instantiate_from_config
from satvideo.diffusion import ZeroSNRDDPMDiscretization

NUM_STEPS = 10
GUIDANCE_SCALE = 6.0
CHANNELS = 4
# Absolute tolerance on latents of unit scale (their std is checked to be about 1): the float32 rounding
# of two implementations of the same arithmetic over 10 steps, measured at <= 2.4e-6.
TOLERANCE = 1e-4


def diffusers_scheduler(cls: type, shift_scale: float):
    """A scheduler configured like CogVideoX's scheduler_config."""
    return cls(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        snr_shift_scale=shift_scale,
        steps_offset=0,
        clip_sample=False,
    )


class StandInTransformer:
    """A fixed v-predictor in diffusers' convention: channel mixing of x + a timestep term + a text term."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(CHANNELS, CHANNELS, generator=generator) / CHANNELS**0.5

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [B, F, C, H, W], timestep [B], text [B, C] -> v [B, F, C, H, W]."""
        mixed = torch.einsum("bfchw,dc->bfdhw", x, self.mix)
        time_term = torch.sin(timestep.float() / 100)[:, None, None, None, None]
        return 0.5 * mixed + 0.1 * time_term + 0.1 * text[:, None, :, None, None]


def run_diffusers_pipeline_loop(scheduler, transformer, latents, text, negative_text, generator=None):
    """The denoising loop of diffusers' CogVideoXPipeline with use_dynamic_cfg=True."""
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = scheduler.timesteps
    old_pred_original_sample = None
    prompt_embeds = torch.cat([negative_text, text])
    for i, t in enumerate(timesteps):
        noise_pred = transformer(torch.cat([latents] * 2), t.expand(2 * latents.shape[0]), prompt_embeds)
        ratio = (NUM_STEPS - t.item()) / NUM_STEPS
        guidance = 1 + GUIDANCE_SCALE * ((1 - math.cos(math.pi * ratio**5.0)) / 2)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            latents, old_pred_original_sample = scheduler.step(
                noise_pred,
                old_pred_original_sample,
                t,
                timesteps[i - 1] if i > 0 else None,
                latents,
                generator=generator,
                return_dict=False,
            )
        else:
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def official_discretization(shift_scale: float) -> dict:
    return {
        "target": "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization",
        "params": {"shift_scale": shift_scale},
    }


def run_satvideo_sampler(sampler_name, shift_scale, transformer, latents, text, negative_text, generator=None):
    """Our sampler and denoiser built from official-style configs, with a DynamicCFG guider."""
    denoiser = instantiate_from_config({
        "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
        "params": {
            "num_idx": 1000,
            "quantize_c_noise": False,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.VideoScaling"},
            "discretization_config": official_discretization(shift_scale),
        },
    })
    sampler = instantiate_from_config({
        "target": f"sgm.modules.diffusionmodules.sampling.{sampler_name}",
        "params": {
            "num_steps": NUM_STEPS,
            "verbose": False,
            "discretization_config": official_discretization(shift_scale),
            "guider_config": {
                "target": "sgm.modules.diffusionmodules.guiders.DynamicCFG",
                "params": {"scale": GUIDANCE_SCALE, "exp": 5, "num_steps": NUM_STEPS},
            },
        },
    })

    def network(x, timesteps, context):
        assert timesteps.dtype == torch.int64
        return transformer(x, timesteps, context["crossattn"])

    def closure(x, alpha, cond):
        return denoiser(network, x, alpha, cond)

    return sampler(closure, latents, {"crossattn": text}, {"crossattn": negative_text}, generator=generator)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 3, CHANNELS, 8, 8, generator=generator)  # [B, F, C, H, W]
    text, negative_text = torch.randn(2, 1, CHANNELS, generator=generator)
    return StandInTransformer(), latents, text, negative_text


@pytest.mark.parametrize("shift_scale", [1.0, 3.0])
def test_alpha_table_matches_diffusers(shift_scale):
    ours = ZeroSNRDDPMDiscretization(shift_scale=shift_scale).alphas_cumprod_sqrt
    theirs = diffusers_scheduler(CogVideoXDDIMScheduler, shift_scale).alphas_cumprod.sqrt()
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=1e-12)


def test_timesteps_are_the_originals_by_default():
    discretization = ZeroSNRDDPMDiscretization()
    for num_steps in range(1, 1001):  # the original: np.linspace(999, 0, n, endpoint=False) cut to integers
        expected = [int(999 + k * (-999 / num_steps)) for k in range(num_steps)]  # numpy's start + k * step
        assert discretization.timesteps(num_steps) == expected, num_steps
    assert discretization.timesteps(30)[:3] == [999, 965, 932]  # trailing: 999, 966, 932


def test_timesteps_match_diffusers_trailing_spacing():
    discretization = ZeroSNRDDPMDiscretization(timestep_spacing="trailing")
    scheduler = diffusers_scheduler(CogVideoXDDIMScheduler, 1.0)
    for num_steps in range(1, 1001):
        scheduler.set_timesteps(num_steps)
        theirs = scheduler.timesteps.tolist()
        # for some step counts diffusers appends a spurious timestep -1; the rest must agree
        assert theirs[num_steps:] in ([], [-1]), num_steps
        assert discretization.timesteps(num_steps) == theirs[:num_steps], num_steps


@pytest.mark.parametrize("shift_scale", [1.0, 3.0])
def test_ddim_matches_diffusers_ddim_loop(inputs, shift_scale):
    transformer, latents, text, negative_text = inputs
    scheduler = diffusers_scheduler(CogVideoXDDIMScheduler, shift_scale)
    theirs = run_diffusers_pipeline_loop(scheduler, transformer, latents.clone(), text, negative_text)
    ours = run_satvideo_sampler("VideoDDIMSampler", shift_scale, transformer, latents.clone(), text, negative_text)
    assert 0.5 < theirs.std() < 2, "latents should be of unit scale for an absolute tolerance"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOLERANCE)


def replay_noise_into_diffusers(monkeypatch, seed: int) -> None:
    """Make diffusers' DPM step use the noise our sampler draws from torch.Generator(seed).

    Before each second-order update diffusers draws a noise it throws away, so its draws alternate
    used / unused after the first; the unused ones get zeros and do not consume the shared stream.
    """
    stream = torch.Generator().manual_seed(seed)
    calls = itertools.count()

    def randn_tensor(shape, generator=None, device=None, dtype=None):
        if next(calls) % 2:
            return torch.zeros(shape, dtype=dtype)
        return torch.randn(shape, generator=stream, dtype=dtype)

    monkeypatch.setattr(dpm_module, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("shift_scale", [1.0, 3.0])
def test_sde_dpmpp_2m_matches_diffusers_dpm_loop(inputs, monkeypatch, shift_scale):
    transformer, latents, text, negative_text = inputs
    seed = 7
    replay_noise_into_diffusers(monkeypatch, seed)
    scheduler = diffusers_scheduler(CogVideoXDPMScheduler, shift_scale)
    theirs = run_diffusers_pipeline_loop(scheduler, transformer, latents.clone(), text, negative_text)
    ours = run_satvideo_sampler(
        "VPSDEDPMPP2MSampler",
        shift_scale,
        transformer,
        latents.clone(),
        text,
        negative_text,
        generator=torch.Generator().manual_seed(seed),
    )
    assert 0.5 < theirs.std() < 2, "latents should be of unit scale for an absolute tolerance"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOLERANCE)
