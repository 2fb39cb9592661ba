"""The training loop: one engine, DeepSpeed for data parallelism, ZeRO sharding, precision and checkpoints.

Read top to bottom: set-up (processes, run folder, data, model, DeepSpeed), optional resume, then the loop that
logs every `log_interval`, validates every `eval_interval` and saves every `save_interval` iterations. The parts
around it have rooms of their own: guards.py (what stops a run), run_folder.py, metrics.py, validation.py, ema.py.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import deepspeed
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from satvideo import distributed
from satvideo.checkpoint import (adapters_base, guard_deepspeed_loads, load_network, lora_metadata, read_latest,
                                 resolve_model_states, safe_load, write_latest, write_zero3_model_states)
from satvideo.config import CheckpointError, ConfigError, SatvideoError, args_namespace
from satvideo.data.health import REASONS, SKIPPED
from satvideo.data.sources import bucket_groups, build_dataset
from satvideo.engine import VideoDiffusionEngine
from satvideo.parallel.layout import Layout, build_layout
from satvideo.parallel.sequence import enable_sequence_parallel
from satvideo.training.data_order import BucketBatches, MicroBatches
from satvideo.training.deepspeed_setup import (build_optimizer, deepspeed_config, fit_buckets_to_model,
                                               skip_allreduce_over_one_rank, training_dtype)
from satvideo.training.ema import EMA
from satvideo.training.guards import (DEFAULT_MAX_BAD_SHARE, BadDataGuard, LauncherWatch, NonFiniteGuard,
                                      check_training_args, check_weights_finite)
from satvideo.training.lr_schedule import lr_multiplier, warmup_iterations, weight_decay_groups
from satvideo.training.metrics import MetricsLog, Window
from satvideo.training.run_folder import (RNG_STATE, RunLock, check_resumable, prune_checkpoints, save_config,
                                          truncate_metrics, validation_logged)
from satvideo.training.validation import Validator

logger = logging.getLogger("satvideo.train")
LORA_TARGETS = ["attention.query_key_value", "attention.dense"]  # SAT's LoraMixin, in every layer


def schedule_from_args(args) -> Callable[[int], float]:
    """SAT's schedule as `training_main` sets it up from the run's args (see lr_schedule)."""
    decay_iters = args.lr_decay_iters or args.train_iters
    return lr_multiplier(args.lr_decay_style, warmup_iterations(args.warmup, decay_iters), decay_iters,
                         args.lr_decay_ratio, auto_warmup=args.mode == "finetune")


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


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


def adapter_record(network: torch.nn.Module, args) -> dict | None:
    """What an adapter-only checkpoint records about its adapters (None when the network has no LoRA)."""
    if "lora" not in network.mixins:
        return None
    lora = network.mixins.lora
    return {"r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": LORA_TARGETS,
            "base": full_weights_of(args.load)}


def full_weights_of(load: str | None) -> str | None:
    """The file of full weights that `args.load` stands for: its model-states file, not the run folder, whose
    `latest` moves on; for an adapter-only checkpoint (LoRA training resumed as a new run), the base it records."""
    if not load:
        return None
    adapters = lora_metadata(load)
    if adapters is not None:
        return full_weights_of(adapters_base(adapters, load))
    return str(resolve_model_states(load).resolve())


def build_deepspeed_engine(config: DictConfig, args, ds: dict, device: torch.device, load_weights: bool):
    """(DeepSpeed engine, LR scheduler): the model with `args.load` weights (when `load_weights`), every part on
    `device`, T5 and VAE in the run's dtype (DeepSpeed casts only the network; a run that trains from a latent
    cache has neither, unless validation videos need them), SAT's parameter groups."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank, frozen parts included
    engine = VideoDiffusionEngine.for_training(config, args)
    if args.load and load_weights:
        load_network(engine.network, args.load, strict=args.strict_load)
    engine.to(device)
    engine.place_frozen_parts(device, training_dtype(ds))
    if args.compile:
        engine.network.compile_layers()
    parameter_groups = weight_decay_groups(engine)  # SAT's: no weight decay on norms and biases
    fit_buckets_to_model(ds, sum(p.numel() for group in parameter_groups for p in group["params"]))
    optimizer = build_optimizer(ds, parameter_groups, device.type == "cuda")
    multiplier = schedule_from_args(args)
    model, _, _, scheduler = deepspeed.initialize(
        model=engine, model_parameters=parameter_groups, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier))
    guard_deepspeed_loads(model)  # a resume reads DeepSpeed's files with the weights-only unpickler
    skip_allreduce_over_one_rank(model)
    return model, scheduler


def batch_order(dataset: Dataset, micro_batch: int, args, layout: Layout) -> MicroBatches | BucketBatches:
    """This rank's resumable micro-batch order (that of its data-parallel replica): by bucket when the data has
    buckets."""
    rank, world_size = layout.data_rank, layout.data_size
    groups = bucket_groups(dataset)
    if groups is None:
        order = MicroBatches(len(dataset), micro_batch, rank, world_size, args.seed)
    else:
        order = BucketBatches(groups, micro_batch, rank, world_size, args.seed)
    if order.batches_per_epoch == 0:
        raise ConfigError(f"args.train_data holds {len(dataset)} samples (with args.train_data_weights): no "
                          f"micro-batch of args.batch_size={micro_batch} for each of {world_size} data-parallel ranks"
                          + (" within one bucket" if groups else ""))
    unused = [(index, len(group)) for index, group in enumerate(groups or []) if len(group) < order.global_batch]
    if unused:  # never drawn: a bucket trains only in whole global batches
        logger.warning("data.params.buckets %s hold %s samples, fewer than args.batch_size=%d x %d data-parallel "
                       "ranks: they are never trained on", [index for index, _ in unused],
                       [count for _, count in unused], micro_batch, world_size)
    return order


def stratify_timesteps_by_replica(engine: VideoDiffusionEngine, layout: Layout) -> None:
    """`uniform_sampling` stratifies timesteps over data-parallel replicas, not ranks: a sequence-parallel group
    draws one timestep set."""
    sampler = getattr(engine.loss_fn, "sigma_sampler", None)
    if sampler is not None and hasattr(sampler, "world_size"):
        sampler.rank, sampler.world_size = layout.data_rank, layout.data_size


def micro_batch_stream(dataset: Dataset, order: MicroBatches | BucketBatches, consumed: int, args,
                       pin_memory: bool) -> Iterator[dict]:
    """Endless micro-batches of this rank, starting after the `consumed` ones."""
    epoch, start = divmod(consumed, order.batches_per_epoch)
    workers = {"prefetch_factor": args.prefetch_factor} if args.num_workers else {}
    while True:
        order.set_position(epoch, start)
        # A private generator: a loader iterator otherwise draws its worker seed from the global RNG,
        # which would shift every later noise draw of a resumed run.
        loader = DataLoader(dataset, batch_sampler=order, num_workers=args.num_workers, pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(args.seed + epoch), **workers)
        yield from loader
        epoch, start = epoch + 1, 0


def train(config: DictConfig) -> None:
    args = args_namespace(config)
    check_training_args(args)  # before anything loads
    device = distributed.init_device(args.device)
    lock = RunLock(Path(args.save), args.lock_timeout) if args.save and distributed.is_main_process() else None
    if lock is not None:
        lock.acquire()
    try:
        run(config, args, device, lock)
    finally:
        if lock is not None:
            lock.release()


def run(config: DictConfig, args, device: torch.device, lock: RunLock | None) -> None:
    # ranks of one sequence-parallel group train on the same samples, timesteps and noise
    layout = build_layout(args.sequence_parallel_size, heads=config.model.network_config.params.get("num_attention_heads"))
    if args.cfg_parallel_size > 1 and distributed.is_main_process():
        logger.warning("args.cfg_parallel_size=%d applies to sample_video.py only; training and its validation "
                       "videos do not split the guidance batch, so it is ignored here", args.cfg_parallel_size)
    # a bad path should not wait for the model
    dataset = build_dataset(config, args.train_data, "args.train_data", args.train_data_weights)
    bad_data = BadDataGuard(config.data.get("max_bad_share", DEFAULT_MAX_BAD_SHARE))
    validator = Validator(config, args, device, layout) if args.eval_interval else None
    ds = deepspeed_config(config, args, device.type == "cuda")
    resume_iteration = read_latest(args.save) if args.save else None
    if resume_iteration is not None:
        resolve_model_states(args.save)  # `latest` names a folder holding the model states
        check_resumable(Path(args.save), config, ds, device.type == "cuda", resume_iteration,
                        distributed.world_size())
        if resume_iteration >= args.train_iters:  # a finished run started again (a requeued job): not an error
            logger.warning("args.save=%s is at iteration %d already, args.train_iters=%d: nothing to train (raise "
                           "args.train_iters to go on)", args.save, resume_iteration, args.train_iters)
            return
    # a resume restores every saved weight; LoRA checkpoints hold only the adapters, so their base loads first
    has_lora = "lora_config" in config.model.network_config.params.modules
    if has_lora and not args.load:
        raise ConfigError("model.network_config.params.modules.lora_config: LoRA adapters train over a base model; "
                          "give its weights as args.load")
    model, scheduler = build_deepspeed_engine(config, args, ds, device, load_weights=resume_iteration is None or has_lora)
    if layout.sequence_group is not None:
        enable_sequence_parallel(model.module.network, layout.sequence_group)
        model.module.encode_group = layout.sequence_group
        stratify_timesteps_by_replica(model.module, layout)
    lora = adapter_record(model.module.network, args)
    ema = EMA(model.module.network, args.ema_decay) if args.ema_decay else None
    replica_seed = (args.seed + layout.data_rank) % 2**32  # replicas draw different noise and timesteps
    torch.manual_seed(replica_seed)
    random.seed(replica_seed)
    np.random.seed(replica_seed)
    micro_batch, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]

    start_iteration = 0
    if resume_iteration is not None:
        start_iteration = resume(model, args, resume_iteration, device, ema, adapters_only=lora is not None)
    if lock is not None:  # everything checked and loaded: this run's config may replace an earlier one's
        save_config(Path(args.save), config)
        truncate_metrics(Path(args.save), start_iteration)  # lines logged after the checkpoint we resume from

    order = batch_order(dataset, micro_batch, args, layout)
    data = micro_batch_stream(dataset, order, start_iteration * accumulation, args,
                              pin_memory=args.pin_memory and device.type == "cuda")
    log = MetricsLog(args, config, device)
    if (validator is not None and args.save and start_iteration and start_iteration % args.eval_interval == 0
            and not validation_logged(Path(args.save), start_iteration)):
        validate(validator, model, start_iteration, args, log, ema)  # the run stopped between its save and this
    guard, launcher = NonFiniteGuard(model, args.max_nonfinite_steps), LauncherWatch()
    window = Window(device, copies=layout.sequence_size)
    for iteration in range(start_iteration + 1, args.train_iters + 1):
        launcher.check(iteration)
        losses = []
        for _ in range(accumulation):
            batch = to_device(next(data), device)
            padded = batch.pop("padded_frames", torch.zeros(1, dtype=torch.long, device=device))
            passed_over = batch.pop(SKIPPED, torch.zeros(len(batch["txt"]), len(REASONS), dtype=torch.long, device=device))
            loss = model(batch)
            model.backward(loss)  # a non-finite loss gives non-finite gradients: ZeRO skips that step
            model.step()
            losses.append(loss.detach())
            window.add_micro_batch(losses[-1], padded, passed_over)
        skipped = guard.after_step(iteration, torch.stack(losses))
        window.add_iteration(skipped)
        if ema is not None and not skipped:
            ema.update()

        saves = args.save and (iteration % args.save_interval == 0 or iteration == args.train_iters)
        # a window never spans a checkpoint, so that a resumed run logs the lines an uninterrupted one does
        if iteration % args.log_interval == 0 or iteration == args.train_iters or saves:
            record = log.record(iteration, window, model, scheduler.get_last_lr()[0],
                                micro_batch * accumulation * layout.data_size)
            log.write(record)
            window.reset()
            bad_data.after_window(iteration, record["samples"], record["bad_samples"])

        paused = time.perf_counter()  # saving and validating are not training time (step_time, samples_per_s)
        if saves:
            if guard.in_row:  # weights unchanged by a skipped step: `latest` stays on the last good checkpoint
                logger.warning("iteration %d: not saving, the last %d optimizer steps were skipped", iteration,
                               guard.in_row)
            else:
                save_checkpoint(model, args, iteration, device, ema, lora)

        if args.eval_interval and iteration % args.eval_interval == 0:  # after the save: it cannot cost a checkpoint
            validate(validator, model, iteration, args, log, ema)
        window.exclude(time.perf_counter() - paused)


def validate(validator: Validator, model, iteration: int, args, log: MetricsLog, ema: EMA | None) -> None:
    """Validation at `iteration`: its record in the log, its videos under {save}/validation/."""
    record, videos = validator(model.module, iteration, Path(args.save) if args.save else None,
                               ema if args.validate_ema else None)
    log.write(record)
    log.log_videos(iteration, videos)


def resume(model, args, iteration: int, device: torch.device, ema: EMA | None, adapters_only: bool) -> int:
    """Weights, optimizer, schedule, RNG and EMA of `{save}/{iteration}`; the iteration to continue after."""
    try:
        _, client_state = model.load_checkpoint(args.save, tag=str(iteration), load_module_strict=not adapters_only)
    except SatvideoError:
        raise
    except Exception as error:  # check_resumable compares what the saved config states; this is the rest
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise CheckpointError(f"args.save={args.save}: iteration {iteration} does not fit this model or ZeRO setup "
                              f"({detail}); resume it as it was trained, or start a new args.save with "
                              f"args.load={args.save}") from error
    iteration_dir = Path(args.save) / str(iteration)
    rng_file = iteration_dir / RNG_STATE.format(rank=distributed.rank())
    if not args.no_load_rng:
        if not rng_file.is_file():  # without it the run goes on, but not as it would have
            raise CheckpointError(f"{rng_file} is missing, so the run cannot resume exactly; set args.no_load_rng=true "
                                  "to resume with fresh random states")
        set_rng_state(safe_load(rng_file), device)
    if ema is not None:
        ema.load_shard(iteration_dir)
    logger.info("resumed from %s at iteration %d", args.save, client_state["iteration"])
    return client_state["iteration"]


def save_checkpoint(model, args, iteration: int, device: torch.device, ema: EMA | None = None,
                    lora: dict | None = None) -> None:
    """Model and optimizer states, this rank's RNG and EMA shard, then (after all ranks finished) `latest`.

    Non-finite weights are never saved. LoRA runs save only the trainable tensors (the adapters) and their
    metadata; with an EMA, `{iteration}-ema/` holds its weights in the SAT layout.
    """
    check_weights_finite(model, iteration)
    client_state = {"iteration": iteration, **({"lora": lora} if lora else {})}
    model.save_checkpoint(args.save, tag=str(iteration), client_state=client_state, save_latest=False,
                          exclude_frozen_parameters=lora is not None)
    iteration_dir = Path(args.save) / str(iteration)
    if model.zero_optimization_partition_weights():
        # ZeRO-3 wrote only weight partitions: gather them (every rank takes part) into the SAT-layout file,
        # which also carries rank 0's shapes and names so that DeepSpeed's zero_to_fp32 reads the folder.
        weights = model._zero3_consolidated_16bit_state_dict()  # what DeepSpeed's save_16bit_model uses
        if distributed.is_main_process():
            if lora is not None:
                trainable = {"model." + name for name, p in model.module.model.named_parameters() if p.requires_grad}
                weights = {key: value for key, value in weights.items() if key in trainable}
            write_zero3_model_states(iteration_dir, weights)  # client_state comes with rank 0's metadata
    torch.save(rng_state(device), iteration_dir / RNG_STATE.format(rank=distributed.rank()))
    if ema is not None:
        ema.save_shard(iteration_dir)
        ema.export(iteration_dir)
    distributed.barrier()
    if distributed.is_main_process():
        write_latest(args.save, iteration)
        prune_checkpoints(Path(args.save), args.keep_last, iteration)
        logger.info("saved iteration %d to %s", iteration, args.save)
    distributed.barrier()
