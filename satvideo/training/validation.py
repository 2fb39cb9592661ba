"""Validation every `args.eval_interval` iterations: a loss comparable across evaluations, and videos.

- Loss: the mean diffusion loss over `args.eval_iters` batches of `args.eval_batch_size` per rank from
  `args.valid_data`, always the same samples, timesteps and noise (each batch draws them from a generator seeded
  by its position), posterior means and no caption dropout. With shape buckets every batch holds one bucket's
  samples: each bucket's, in order, `args.eval_batch_size` at a time (a bucket's last batch may be smaller; the
  loss is the mean over samples).
- Videos: each prompt of `args.validation_prompts` (a list, or a file with one per line; `prompt@@image.png` for
  image-to-video) sampled with seed `args.seed + i` by the configured sampler, decoded `args.decode_chunk_frames`
  latent frames at a time, written to `{save}/validation/{iteration:07d}/` and sent to wandb when it is on. Prompts
  are shared round-robin over the ranks, each rank sampling the same number (ZeRO-3 needs every rank in every
  forward pass), one video at a time.

Validation draws nothing from the global RNG, so a resumed run stays bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import default_collate

from satvideo import distributed
from satvideo.config import ConfigError, SatvideoError
from satvideo.data.sources import bucket_groups, build_dataset, model_reads_images
from satvideo.parallel.layout import Layout
from satvideo.sampling import VideoPlan, read_prompts, request_from_line, save_video, slugify
from satvideo.training.ema import EMA

logger = logging.getLogger("satvideo.train")


def validation_prompts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return read_prompts(value, "args.validation_prompts")
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(prompt) for prompt in value]
    raise ConfigError(f"args.validation_prompts={value!r}: expected a list of prompts or a text file")


def single_bucket_batches(groups: list, size: int) -> list[list[int]]:
    """Each bucket's sample indices in order, `size` at a time."""
    return [[int(index) for index in group[start:start + size]] for group in groups
            for start in range(0, len(group), size)]


class Validator:
    def __init__(self, config: DictConfig, args, device: torch.device, layout: Layout | None = None):
        """`layout`: ranks of one sequence-parallel group evaluate the same samples; its first rank writes videos."""
        self.args, self.device = args, device
        self.dataset = build_dataset(config, args.valid_data, "args.valid_data") if args.valid_data else None
        groups = bucket_groups(self.dataset) if self.dataset is not None else None
        self.bucketed = single_bucket_batches(groups, args.eval_batch_size) if groups is not None else None
        self.prompts = validation_prompts(args.validation_prompts)
        if args.validation_prompts is not None and not self.prompts:
            raise ConfigError(f"args.validation_prompts={args.validation_prompts}: holds no prompt")
        self.plan = self.checked_plan(config, args) if self.prompts else None
        layout = layout or Layout(data_rank=distributed.rank(), data_size=distributed.world_size())
        self.rank, self.world_size, self.writes = layout.data_rank, layout.data_size, layout.leads_its_group
        if self.dataset is not None:  # unusable data stops the run now, not at the first evaluation
            try:
                [self.dataset[index] for index in self.batch_indices(self.rank)]
            except SatvideoError as error:
                raise ConfigError(f"args.valid_data: {error}") from None
            if distributed.is_main_process():
                self.warn_about_repeats()

    def warn_about_repeats(self) -> None:
        """The loss weighs every drawn sample alike: a validation set smaller than one evaluation's draws counts
        some of its samples more than once."""
        batches = self.args.eval_iters * self.world_size
        if self.bucketed is not None and batches > len(self.bucketed):
            logger.warning("args.valid_data makes %d single-bucket batches of args.eval_batch_size=%d; args.eval_iters"
                           "=%d on %d data-parallel ranks draws %d, so some count more than once in valid_loss",
                           len(self.bucketed), self.args.eval_batch_size, self.args.eval_iters, self.world_size,
                           batches)
        elif self.bucketed is None and batches * self.args.eval_batch_size > len(self.dataset):
            logger.warning("args.valid_data holds %d samples; args.eval_iters=%d x args.eval_batch_size=%d x %d "
                           "data-parallel ranks draws %d, so some count more than once in valid_loss",
                           len(self.dataset), self.args.eval_iters, self.args.eval_batch_size, self.world_size,
                           batches * self.args.eval_batch_size)

    def checked_plan(self, config: DictConfig, args) -> VideoPlan:
        """The sampling plan of the validation videos, every prompt (its image, for an image-to-video model, which
        needs one) checked now rather than at the first evaluation, hours into the run."""
        plan = VideoPlan(argparse.Namespace(**{**vars(args), "image2video": model_reads_images(config)}),
                         config.model.network_config.params)
        for index, line in enumerate(self.prompts):
            request = request_from_line(line, index, args.seed + index)
            try:
                plan.check(request)
            except ConfigError as error:
                raise ConfigError(f"args.validation_prompts: {error}") from None
        return plan

    def __call__(self, engine, iteration: int, out_dir: Path | None, ema: EMA | None = None
                 ) -> tuple[dict, list[Path]]:
        """(a metrics record, the paths of all validation videos) — every rank calls it. With `ema` the record also
        holds `valid_loss_ema`, the loss of the averaged weights, and the videos are sampled with those."""
        engine.eval()
        try:
            record = {"iteration": iteration}
            if self.dataset is not None:
                record["valid_loss"] = self.loss(engine)
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                if ema is not None and self.dataset is not None:
                    record["valid_loss_ema"] = self.loss(engine)
                videos = self.videos(engine, iteration, out_dir) if self.prompts and out_dir is not None else []
        finally:
            engine.train()
        return record, videos

    def batch_indices(self, batch_index: int) -> list[int]:
        """The samples of validation batch `batch_index`, the same at every evaluation."""
        if self.bucketed is not None:
            return self.bucketed[batch_index % len(self.bucketed)]
        size = self.args.eval_batch_size
        return [(batch_index * size + j) % len(self.dataset) for j in range(size)]

    @torch.no_grad()
    def loss(self, engine) -> float:
        total = torch.zeros(2, device=self.device)  # (sum of batch losses times their sizes, samples)
        for step in range(self.args.eval_iters):
            batch_index = step * self.world_size + self.rank
            items = [self.dataset[index] for index in self.batch_indices(batch_index)]
            batch = {key: value.to(self.device) if torch.is_tensor(value) else value
                     for key, value in default_collate(items).items()}
            generator = torch.Generator().manual_seed(self.args.seed + batch_index)
            loss = engine.validation_loss(batch, generator).float()
            total += torch.stack([loss * len(items), torch.tensor(float(len(items)), device=self.device)])
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def videos(self, engine, iteration: int, out_dir: Path) -> list[Path]:
        folder = out_dir / "validation" / f"{iteration:07d}"
        paths = [folder / f"{index:02d}_{slugify(line.partition('@@')[0])}.mp4" for index, line in enumerate(self.prompts)]
        per_rank = math.ceil(len(self.prompts) / self.world_size)
        for slot in range(per_rank):
            index = slot * self.world_size + self.rank
            real = index < len(self.prompts)
            line = self.prompts[index if real else 0]  # a rank without a prompt left samples one and drops it
            request = request_from_line(line, index, self.args.seed + index)
            shape, first_frames, _ = self.plan.inputs(request, num_samples=1)
            generator = torch.Generator().manual_seed(request.seed)
            latents = engine.sample([request.prompt], shape, generator, first_frames=first_frames)
            if real and self.writes:
                video = engine.decode_first_stage(latents, chunk_frames=self.args.decode_chunk_frames,
                                                  tile=self.args.vae_tiling, overlap=self.args.vae_tile_overlap)
                save_video(video[0].cpu(), str(paths[index]), fps=self.args.sampling_fps)
        distributed.barrier()
        return paths
