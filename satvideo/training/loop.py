"""The training loop: one engine, DeepSpeed for data parallelism, ZeRO sharding, precision and checkpoints.

Read top to bottom: set-up (processes, model, data, DeepSpeed), optional resume, then the loop that logs
every `log_interval` and saves every `save_interval` iterations.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

import deepspeed
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from satvideo import distributed
from satvideo.config import ConfigError, args_namespace, instantiate_from_config, to_plain
from satvideo.engine import VideoDiffusionEngine
from satvideo.checkpoint import load_network, read_latest, write_latest, write_zero3_model_states
from satvideo.training.data_order import ResumableSampler
from satvideo.training.deepspeed_setup import build_optimizer, deepspeed_config, training_dtype
from satvideo.training.lr_schedule import lr_multiplier, warmup_iterations, weight_decay_groups

logger = logging.getLogger("satvideo.train")

def schedule_from_args(args) -> Callable[[int], float]:
    """SAT's schedule as `training_main` sets it up from the run's args (see lr_schedule)."""
    decay_iters = args.lr_decay_iters or args.train_iters
    return lr_multiplier(args.lr_decay_style, warmup_iterations(args.warmup, decay_iters), decay_iters,
                         args.lr_decay_ratio, auto_warmup=args.mode == "finetune")


def build_dataset(config: DictConfig, args) -> Dataset:
    if not args.train_data:
        raise ConfigError("args.train_data: give one or more dataset folders")
    if "data" not in config:
        raise ConfigError("the config has no `data` section (target/params of the dataset)")
    folders = [args.train_data] if isinstance(args.train_data, str) else list(args.train_data)
    datasets = []
    for folder in folders:
        try:
            datasets.append(instantiate_from_config(config.data, data_dir=folder))
        except (FileNotFoundError, ValueError) as error:  # ConfigError included: name the folder
            raise ConfigError(f"args.train_data {folder}: {error}") from error
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch RNG states, and that of this rank's GPU only (a resume may see fewer GPUs)."""
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class MetricsLog:
    """The log line on rank 0, a `metrics.jsonl` beside the checkpoints, and wandb when enabled."""

    def __init__(self, args, config: DictConfig):
        self.enabled = distributed.is_main_process()
        self.path = Path(args.save) / "metrics.jsonl" if args.save and self.enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if args.wandb and self.enabled:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.experiment_name,
                                    config=to_plain(config), dir=args.save)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        print(" | ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in record.items()), flush=True)
        if self.path is not None:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["iteration"])


def build_deepspeed_engine(config: DictConfig, args, ds: dict, device: torch.device, load_weights: bool):
    """(DeepSpeed engine, LR scheduler): the model with `args.load` weights (when `load_weights`), every part on
    `device`, T5 and VAE in the run's dtype (DeepSpeed casts only the network), SAT's parameter groups."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank, frozen parts included
    engine = VideoDiffusionEngine.from_config(config.model, checkpoint_activations=args.checkpoint_activations)
    if args.load and load_weights:
        load_network(engine.network, args.load, strict=args.strict_load)
    engine.to(device)
    engine.place_frozen_parts(device, training_dtype(ds))
    parameter_groups = weight_decay_groups(engine)  # SAT's: no weight decay on norms and biases
    optimizer = build_optimizer(ds, parameter_groups, device.type == "cuda")
    multiplier = schedule_from_args(args)
    model, _, _, scheduler = deepspeed.initialize(
        model=engine, model_parameters=parameter_groups, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier))
    return model, scheduler


def train(config: DictConfig) -> None:
    args = args_namespace(config)
    device = distributed.init_device(args.device)
    on_gpu = device.type == "cuda"
    rank, world_size = distributed.rank(), distributed.world_size()
    dataset = build_dataset(config, args)  # first: a bad data path should not wait for the model to load
    ds = deepspeed_config(config, args, on_gpu)
    resume_iteration = read_latest(args.save) if args.save else None
    model, scheduler = build_deepspeed_engine(config, args, ds, device, load_weights=resume_iteration is None)
    torch.manual_seed(args.seed + rank)  # ranks draw different noise and timesteps
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    micro_batch, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]

    start_iteration = 0
    if resume_iteration is not None:
        _, client_state = model.load_checkpoint(args.save, tag=str(resume_iteration))
        start_iteration = client_state["iteration"]
        rng_file = Path(args.save) / str(resume_iteration) / f"rng_rank{rank}.pt"
        if rng_file.is_file() and not args.no_load_rng:
            set_rng_state(torch.load(rng_file, weights_only=False), device)
        logger.info("resumed from %s at iteration %d", args.save, start_iteration)

    sampler = ResumableSampler(len(dataset), rank, world_size, args.seed)
    batches_per_epoch = len(sampler) // micro_batch
    if batches_per_epoch == 0:
        raise ConfigError(f"args.batch_size={micro_batch} exceeds the {len(sampler)} samples each rank gets")

    def micro_batches(consumed: int):
        """Endless micro-batches, starting after the `consumed` ones of this rank."""
        epoch, start = divmod(consumed, batches_per_epoch)
        while True:
            sampler.set_position(epoch, start * micro_batch)
            # A private generator: a loader iterator otherwise draws its worker seed from the global RNG,
            # which would shift every later noise draw of a resumed run.
            loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=args.num_workers,
                                drop_last=True, generator=torch.Generator().manual_seed(args.seed + epoch))
            yield from loader
            epoch, start = epoch + 1, 0

    data = micro_batches(start_iteration * accumulation)
    log = MetricsLog(args, config)
    # summed over a log window: loss, clips padded with copies of their last frame, such copies
    window, window_steps, window_start = torch.zeros(3, device=device), 0, time.perf_counter()
    for iteration in range(start_iteration + 1, args.train_iters + 1):
        for _ in range(accumulation):
            batch = to_device(next(data), device)
            padded = batch.pop("padded_frames", torch.zeros(1, dtype=torch.long, device=device))
            loss = model(batch)
            model.backward(loss)
            model.step()
            window += torch.stack([loss.detach() / accumulation, (padded > 0).sum(), padded.sum()])  # no host sync
        window_steps += 1

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            torch.distributed.all_reduce(window)
            loss_sum, padded_clips, padded_frames = window.tolist()
            elapsed = time.perf_counter() - window_start
            log.write({"iteration": iteration, "loss": loss_sum / window_steps / world_size,
                       "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": window_steps * accumulation * micro_batch * world_size / elapsed,
                       "padded_clips": int(padded_clips), "padded_frames": int(padded_frames)})
            window, window_steps, window_start = torch.zeros(3, device=device), 0, time.perf_counter()

        if args.save and (iteration % args.save_interval == 0 or iteration == args.train_iters):
            save_checkpoint(model, args.save, iteration, device)


def save_checkpoint(model, save_dir: str, iteration: int, device: torch.device) -> None:
    """Model and optimizer states, this rank's RNG, then (after all ranks finished) the `latest` pointer."""
    model.save_checkpoint(save_dir, tag=str(iteration), client_state={"iteration": iteration}, save_latest=False)
    iteration_dir = Path(save_dir) / str(iteration)
    if model.zero_optimization_partition_weights():
        # ZeRO-3 wrote only weight partitions: gather them (every rank takes part) into the SAT-layout file,
        # which also carries rank 0's shapes and names so that DeepSpeed's zero_to_fp32 reads the folder.
        weights = model._zero3_consolidated_16bit_state_dict()  # what DeepSpeed's save_16bit_model uses
        if distributed.is_main_process():
            write_zero3_model_states(iteration_dir, weights)
    torch.save(rng_state(device), iteration_dir / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main_process():
        write_latest(save_dir, iteration)
        logger.info("saved iteration %d to %s", iteration, save_dir)
    distributed.barrier()
