"""Diffusion parts, each built from a `{target, params}` config: schedule, denoiser, loss, samplers, guidance."""

from satvideo.diffusion.denoiser import DiscreteDenoiser, EpsWeighting, VideoScaling
from satvideo.diffusion.discretization import ZeroSNRDDPMDiscretization
from satvideo.diffusion.guiders import DynamicCFG, VanillaCFG
from satvideo.diffusion.loss import VideoDiffusionLoss
from satvideo.diffusion.samplers import VideoDDIMSampler, VPODEDPMPP2MSampler, VPSDEDPMPP2MSampler
from satvideo.diffusion.sigma_sampling import DiscreteSampling

__all__ = [
    "DiscreteDenoiser",
    "DiscreteSampling",
    "DynamicCFG",
    "EpsWeighting",
    "VanillaCFG",
    "VideoDDIMSampler",
    "VideoDiffusionLoss",
    "VideoScaling",
    "VPODEDPMPP2MSampler",
    "VPSDEDPMPP2MSampler",
    "ZeroSNRDDPMDiscretization",
]
