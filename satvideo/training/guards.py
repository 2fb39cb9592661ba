"""What keeps a run from going on wrong: run options checked before anything loads, optimizer steps skipped on
non-finite values (counted, and fatal after `args.max_nonfinite_steps` in a row), too many unusable samples
(`data.max_bad_share`), and weights checked before they are saved.

Skipping is DeepSpeed's: under ZeRO (stage >= 1), fp16 or bf16 its optimizer checks the gradient norm before
every update and, when it is not finite (from a NaN or inf loss on any rank, or an fp16 overflow), skips the
update on every rank alike, leaves the LR schedule where it is and counts the step in `engine.skipped_steps`.
Stage 0 in fp32 hands the step to the optimizer itself, which then makes the same check (SkipsNonFiniteSteps).
"""

from __future__ import annotations

import math
import os

import torch

from satvideo import distributed
from satvideo.config import ConfigError, TrainingError
from satvideo.data.health import REASONS
from satvideo.engine import check_decode_args

# The share of bad samples is judged against at least this many draws, so that a few bad files among the first
# batches do not stop a run.
MIN_DRAWS_JUDGED = 100
DEFAULT_MAX_BAD_SHARE = 0.05  # data.max_bad_share


def check_training_args(args) -> None:
    """What the config's per-key rules (config.ARGS_RULES) cannot see: validation needs something to validate,
    decoding options must fit each other. A bad one is a ConfigError before any model or data loads."""
    if args.eval_interval and not (args.valid_data or args.validation_prompts):
        raise ConfigError("args.eval_interval is set but there is nothing to validate: give args.valid_data "
                          "and/or args.validation_prompts")
    if args.eval_interval and args.validation_prompts and not args.save:
        raise ConfigError("args.validation_prompts: validation videos are written under args.save; set it")
    if args.validate_ema and not (args.ema_decay and args.eval_interval):
        raise ConfigError("args.validate_ema: validating the EMA weights needs args.ema_decay and args.eval_interval")
    check_decode_args(args)  # validation videos decode with these


class SkipsNonFiniteSteps:
    """Mixed into a torch optimizer: no update when the gradients' norm is not finite, and `overflow` set, which
    DeepSpeed reads after every step to count it as skipped and hold the LR schedule (as for its own optimizers);
    otherwise the gradients are clipped to `max_grad_norm` (DeepSpeed's `gradient_clipping`, applied here so that
    the norm is computed once and reported as `grad_norm`). Gradients are all-reduced before the step, so every
    rank decides alike."""

    overflow = False
    max_grad_norm = 0.0  # 0: no clipping

    def step(self, closure=None):
        with_gradients = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not with_gradients:
            return super().step(closure)
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_gradients])
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self._global_grad_norm = float("inf")  # as DeepSpeed's optimizers report a skipped step
            return None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(with_gradients, self.max_grad_norm, norm)
        return super().step(closure)


def skipping_nonfinite_steps(optimizer_class: type[torch.optim.Optimizer],
                             max_grad_norm: float) -> type[torch.optim.Optimizer]:
    """`optimizer_class` with SkipsNonFiniteSteps; its state dict is the class's own."""
    return type(optimizer_class.__name__, (SkipsNonFiniteSteps, optimizer_class), {"max_grad_norm": max_grad_norm})


class NonFiniteGuard:
    """Counts the optimizer steps DeepSpeed skipped and stops the run after `max_in_row` consecutive ones.

    Under fp16, a skipped step whose losses were all finite is a loss-scale overflow: DeepSpeed halves the
    scale and goes on (the first steps of a run do this several times while the scale settles, and DeepSpeed
    itself stops at its minimum scale). Such steps are counted as skipped but do not make a fatal run.
    """

    def __init__(self, engine, max_in_row: int):
        self.engine, self.max_in_row = engine, max_in_row
        self.seen = engine.skipped_steps  # restored by a resume
        self.in_row = 0
        self.fp16 = engine.fp16_enabled()

    def after_step(self, iteration: int, losses: torch.Tensor) -> bool:
        """True when this iteration's update was skipped (`losses`: its micro-batch losses); TrainingError after
        too many non-finite steps in a row."""
        skipped = self.engine.skipped_steps > self.seen
        self.seen = self.engine.skipped_steps
        if not skipped:
            self.in_row = 0
        elif not (self.fp16 and bool(torch.isfinite(losses).all())):
            self.in_row += 1
        if self.in_row >= self.max_in_row:
            raise TrainingError(f"iteration {iteration}: {self.in_row} optimizer steps in a row skipped for non-finite "
                                f"loss or gradients (args.max_nonfinite_steps={self.max_in_row}); stopping. Check the "
                                "learning rate, model.scale_factor and the data")
        return skipped


class BadDataGuard:
    """Stops the run when more than `max_bad_share` of the samples drawn so far (all ranks) could not be used."""

    def __init__(self, max_bad_share: float = DEFAULT_MAX_BAD_SHARE):
        if not isinstance(max_bad_share, (int, float)) or isinstance(max_bad_share, bool) or not 0 <= max_bad_share <= 1:
            raise ConfigError(f"data.max_bad_share={max_bad_share!r}: expected a share between 0 and 1")
        self.max_bad_share = float(max_bad_share)
        self.good, self.bad = 0, dict.fromkeys(REASONS, 0)

    def after_window(self, iteration: int, good: int, bad: dict[str, int]) -> None:
        """Adds a log window's counts (the same on every rank); TrainingError above the share."""
        self.add(good, bad)
        self.check(f"iteration {iteration}")

    def add(self, good: int, bad: dict[str, int]) -> None:
        self.good += good
        for reason, count in bad.items():
            self.bad[reason] += count

    def too_many(self, bad: int, drawn: int) -> bool:
        """The rule: more bad samples than max_bad_share of those drawn, judged over at least MIN_DRAWS_JUDGED."""
        return bad > self.max_bad_share * max(drawn, MIN_DRAWS_JUDGED)

    def check(self, where: str) -> None:
        """TrainingError starting with `where` when the bad share so far is above the limit."""
        total_bad = sum(self.bad.values())
        drawn = self.good + total_bad
        if self.too_many(total_bad, drawn):
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.bad.items() if count)
            raise TrainingError(f"{where}: {total_bad} of {drawn} samples drawn could not be used "
                                f"({total_bad / drawn:.1%}, above data.max_bad_share={self.max_bad_share:g}): "
                                f"{reasons}; scripts/check_dataset.py lists the files")


def check_weights_finite(engine, iteration: int) -> None:
    """TrainingError, on every rank alike, if a trainable weight of this rank's share is NaN or inf."""
    bad = torch.zeros((), device=engine.device)
    for parameter in engine.module.parameters():
        if parameter.requires_grad:
            local = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3: this rank's partition
            bad += (~torch.isfinite(local)).any()
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise TrainingError(f"iteration {iteration}: the weights hold NaN or inf; not saving this checkpoint "
                            "(latest still names the previous one)")


class LauncherWatch:
    """Under torchrun, a worker whose launcher was killed is re-parented; it stops instead of training on alone
    (and writing into a folder that a restarted run would use)."""

    def __init__(self):
        self.launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def check(self, iteration: int) -> None:
        if self.launcher is not None and os.getppid() != self.launcher:
            raise TrainingError(f"iteration {iteration}: the torchrun launcher (pid {self.launcher}) is gone; "
                                "stopping this worker")
