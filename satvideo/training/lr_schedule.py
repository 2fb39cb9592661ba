"""Learning-rate multiplier: linear warm-up, then constant, linear or cosine decay to `min_ratio`."""

from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(style: str, warmup_iters: int, decay_iters: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    if style not in ("constant", "linear", "cosine"):
        raise ValueError(f"args.lr_decay_style={style!r}: expected constant, linear or cosine")

    def multiplier(step: int) -> float:
        if step < warmup_iters:
            return (step + 1) / warmup_iters
        if style == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_iters) / max(1, decay_iters - warmup_iters))
        decay = 1.0 - progress if style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return multiplier


def warmup_iterations(warmup: float, train_iters: int) -> int:
    """`args.warmup` below 1 is a fraction of the run, otherwise a number of iterations."""
    return int(warmup * train_iters) if warmup < 1 else int(warmup)
