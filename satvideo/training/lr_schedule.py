"""SwissArmyTransformer's learning-rate schedule (`AnnealingLR` as `training_main` sets it up), as a multiplier
of the optimizer's lr, and SAT's weight-decay parameter groups.

With n the 1-based number of the optimizer step, W the warm-up length and D = lr_decay_iters:
- "finetune" mode: for n <= 100, min(0.05, n / W) (SAT's auto warm-up, which overrides the rest);
- n <= W: n / W;
- linear: (D - (n - W)) / D, floored at 0 (SAT's own would turn negative past D + W);
- cosine: r + (1 - r) * (1 + cos(pi * min(1, (n - W) / D))) / 2, r = lr_decay_ratio;
- constant and exponential (SAT computes no decay for it): 1.
"""

from __future__ import annotations

import math
from typing import Callable

from sat.ops.layernorm import LayerNorm, RMSNorm
from torch import nn

from satvideo.config import DECAY_STYLES, ConfigError
AUTO_WARMUP_ITERS, AUTO_WARMUP_RATE = 100, 0.05  # SAT's get_learning_rate_scheduler defaults
NO_WEIGHT_DECAY_MODULES = (nn.LayerNorm, LayerNorm, RMSNorm)  # SAT's NO_WD_MODULES


def lr_multiplier(style: str, warmup_iters: float, decay_iters: int, decay_ratio: float = 0.1,
                  auto_warmup: bool = False) -> Callable[[int], float]:
    """step (0-based, as torch's LambdaLR counts) -> factor on the optimizer's lr."""
    if style not in DECAY_STYLES:
        raise ConfigError(f"args.lr_decay_style={style!r}: expected one of {', '.join(DECAY_STYLES)}")
    decay_iters = max(1, decay_iters)

    def multiplier(step: int) -> float:
        n = step + 1
        if auto_warmup and n <= AUTO_WARMUP_ITERS:
            return min(AUTO_WARMUP_RATE, n / warmup_iters) if warmup_iters > 0 else AUTO_WARMUP_RATE
        if warmup_iters > 0 and n <= warmup_iters:
            return n / warmup_iters
        if style == "linear":
            return max(0.0, (decay_iters - (n - warmup_iters)) / decay_iters)
        if style == "cosine":
            progress = min(1.0, (n - warmup_iters) / decay_iters)
            return decay_ratio + (1.0 - decay_ratio) * (1.0 + math.cos(math.pi * progress)) / 2
        return 1.0

    return multiplier


def warmup_iterations(warmup: float, decay_iters: int) -> float:
    """`args.warmup` below 1 is a fraction of lr_decay_iters (SAT), otherwise a number of iterations."""
    return warmup * decay_iters if warmup < 1 else float(warmup)


def weight_decay_groups(module: nn.Module) -> list[dict]:
    """SAT's groups: LayerNorm/RMSNorm parameters and every bias without weight decay, the rest with it.

    Only parameters that require gradients are included; empty groups are left out.
    """
    decay, no_decay = [], []
    for submodule in module.modules():
        for name, parameter in submodule.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            exempt = (isinstance(submodule, NO_WEIGHT_DECAY_MODULES) or name == "bias"
                      or getattr(parameter, "no_weight_decay", False))
            (no_decay if exempt else decay).append(parameter)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
