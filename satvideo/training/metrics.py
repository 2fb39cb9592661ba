"""The training log: one line per `args.log_interval` iterations (and at every checkpoint) on rank 0, the same
record appended to `{save}/metrics.jsonl` and, with `args.wandb`, sent to Weights & Biases (offline when no API key
is set).

Fields: iteration; loss (mean over the window's finite micro-batch losses, all ranks); lr; grad_norm (of the
last update); nonfinite_losses and skipped_steps (in the window); samples_per_s (all ranks) and step_time (s per
iteration), both without the time spent saving checkpoints and validating; peak_memory_gb (CUDA: peak allocated
on rank 0 in the window; CPU: peak resident set of rank 0);
mfu (GPU only: model FLOPs per second over the GPU's dense bf16/fp16 peak); padded_clips and padded_frames;
samples (drawn, all ranks) and bad_samples (those passed over, by reason, in the window; see data/health.py).
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from satvideo import distributed
from satvideo.config import to_plain
from satvideo.data.health import REASONS, tally_dict

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12,
              "A10": 125e12}  # after A100: the first matching fragment wins


def training_flops_per_sample(network: torch.nn.Module, tokens: int) -> float:
    """Forward + backward model FLOPs of one sample of `tokens` tokens: 6 per parameter per token, plus attention's
    12 * layers * hidden * tokens^2 (activation recomputation not counted, as MFU defines it)."""
    parameters = sum(parameter.numel() for parameter in network.parameters())
    return 6.0 * parameters * tokens + 12.0 * network.num_layers * network.hidden_size * tokens**2


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_FLOPS.items() if fragment in name), None)


def wandb_mode() -> str:
    """online with an API key (environment or ~/.netrc), else offline: runs never wait for a login."""
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class Window:
    """Sums over one log window, kept on the device (no host sync until the log line)."""

    FIELDS = ("loss_sum", "finite_losses", "nonfinite_losses", "padded_clips", "padded_frames", "samples",
              *(f"bad:{reason}" for reason in REASONS))

    def __init__(self, device: torch.device, copies: int = 1):
        """`copies`: ranks that see each sample (a sequence-parallel group), so that counts are of samples."""
        self.device, self.copies = device, copies
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.FIELDS), device=self.device)
        self.iterations, self.skipped, self.start, self.excluded = 0, 0, time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent in the window on other things than training (checkpoints, validation)."""
        self.excluded += seconds

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def add_micro_batch(self, loss: torch.Tensor, padded: torch.Tensor, skipped: torch.Tensor) -> None:
        """`padded`: [B] frames padded per clip; `skipped`: [B, len(REASONS)] samples passed over before each."""
        finite = torch.isfinite(loss)
        self.sums += torch.cat([torch.stack([torch.where(finite, loss, 0.0), finite.float(), (~finite).float(),
                                             (padded > 0).sum().float(), padded.sum().float(),
                                             loss.new_tensor(float(skipped.shape[0]))]),
                                skipped.sum(dim=0).float()])

    def add_iteration(self, skipped: bool) -> None:
        self.iterations += 1
        self.skipped += int(skipped)

    def totals(self) -> dict[str, float]:
        """Summed over ranks (a collective: every rank calls it)."""
        if distributed.world_size() > 1:
            torch.distributed.all_reduce(self.sums)
        return dict(zip(self.FIELDS, (self.sums / self.copies).tolist()))


class MetricsLog:
    """The log line on rank 0, a `metrics.jsonl` beside the checkpoints, and wandb when enabled."""

    def __init__(self, args, config: DictConfig, device: torch.device):
        self.enabled = distributed.is_main_process()
        self.path = Path(args.save) / "metrics.jsonl" if args.save and self.enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.peak_flops = peak_flops(device)
        self.wandb = None
        if args.wandb and self.enabled:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.experiment_name, config=to_plain(config),
                                    dir=args.save, mode=wandb_mode(), resume="allow")

    def record(self, iteration: int, window: Window, engine, lr: float, samples_per_iteration: int) -> dict:
        """The log record of a window (a collective: every rank calls it)."""
        totals = window.totals()
        elapsed = window.training_seconds()
        grad_norm = engine.get_global_grad_norm()
        record = {
            "iteration": iteration,
            "loss": totals["loss_sum"] / max(totals["finite_losses"], 1.0),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "nonfinite_losses": int(totals["nonfinite_losses"]),
            "skipped_steps": window.skipped,
            "samples_per_s": window.iterations * samples_per_iteration / elapsed,
            "step_time": elapsed / max(window.iterations, 1),
            "peak_memory_gb": distributed.peak_memory_gb(self.device, reset=True),
            "padded_clips": int(totals["padded_clips"]),
            "padded_frames": int(totals["padded_frames"]),
            "samples": int(totals["samples"]),
            "bad_samples": tally_dict([totals[f"bad:{reason}"] for reason in REASONS]),
        }
        tokens = getattr(engine.module, "tokens_per_sample", None)
        if self.peak_flops and tokens:
            per_gpu = record["samples_per_s"] / distributed.world_size()
            record["mfu"] = training_flops_per_sample(engine.module.network, tokens) * per_gpu / self.peak_flops
        return record

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        print(" | ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in record.items()), flush=True)
        if self.path is not None:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({key: value for key, value in record.items() if value is not None}, step=record["iteration"])

    def log_videos(self, iteration: int, paths: list[Path]) -> None:
        if self.wandb is not None and paths:
            import wandb

            self.wandb.log({"validation/videos": [wandb.Video(str(path), format="mp4") for path in paths]},
                           step=iteration)
