"""Classifier-free guidance: one batched pass over [uncond; cond], then uncond + scale * (cond - uncond)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from satvideo.config import FINITE_NUMBER, Rule, check_value, is_number

GUIDER_KEY = "model.sampler_config.params.guider_config.params"
# a negative ratio has no real non-integer power (see DynamicCFG); 5.0 from a YAML file is an integer
INTEGER_EXPONENT: Rule = (lambda value: is_number(value) and float(value).is_integer(), "an integer, e.g. 5")


class VanillaCFG:
    """Classifier-free guidance with a constant scale."""

    def __init__(self, scale: float):
        check_value(f"{GUIDER_KEY}.scale", scale, FINITE_NUMBER)
        self.scale = scale

    def scale_at(self, timestep: int) -> float:
        """The guidance scale at a raw timestep."""
        return self.scale

    def prepare_inputs(self, x: Tensor, alpha: Tensor, cond: dict, uc: dict) -> tuple[Tensor, Tensor, dict]:
        """Double the batch: x, alpha and every tensor of the conditioning as [uncond; cond].

        Non-tensor entries (flags, sizes) are shared and taken from cond.
        """
        both = {key: torch.cat([uc[key], value]) if isinstance(value, Tensor) else value for key, value in cond.items()}
        return torch.cat([x, x]), torch.cat([alpha, alpha]), both

    def __call__(self, denoised: Tensor, timestep: int) -> Tensor:
        """Combine the doubled-batch output [2B, ...] into the guided one [B, ...]."""
        uncond, cond = denoised.chunk(2)
        return uncond + self.scale_at(timestep) * (cond - uncond)


class DynamicCFG(VanillaCFG):
    """Guidance rising from 1 to 1 + scale as cosine of the step: 1 + scale * (1 - cos(pi * r ** exp)) / 2.

    r = (num_steps - t) / num_steps with t the RAW timestep (0..999), not the step index, exactly as the
    official code and diffusers' CogVideoXPipeline compute it, so r is mostly negative and the scale jumps
    pseudo-randomly within [1, 1 + scale] over a run. exp must be an integer (a negative r has no real
    non-integer power).
    """

    def __init__(self, scale: float, exp: int, num_steps: int):
        super().__init__(scale)
        check_value(f"{GUIDER_KEY}.exp", exp, INTEGER_EXPONENT)
        self.exp = exp
        self.num_steps = num_steps

    def scale_at(self, timestep: int) -> float:
        ratio = (self.num_steps - timestep) / self.num_steps
        return 1 + self.scale * (1 - math.cos(math.pi * ratio**self.exp)) / 2
