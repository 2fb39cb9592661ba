"""VideoDiffusionEngine: the network, denoiser, conditioner, VAE, loss and sampler of one model.

Only the network is a registered submodule (`model.diffusion_model.*`, the official checkpoint prefix): the
frozen T5 conditioner and VAE are owned by the engine but kept out of `parameters()` and `state_dict()`, so
they never reach the optimizer or a checkpoint. `.to()`/`.half()` still move them along.

An engine that trains from a latent cache (satvideo.data.cache; `cached_text_widths` given) builds no T5: only the
posterior regularizer that draws latents from the cached moments and a CachedTextConditioner that applies caption
dropout to the cached text features. It builds the VAE only for an image-to-video model, which encodes its noised
conditioning frame (cached in pixels) at every step, as from the videos.
"""

from __future__ import annotations

import difflib
import logging
import random
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from satvideo.checkpoint import NETWORK_PREFIX, is_lora_matrix
from satvideo.conditioner import CachedTextConditioner
from satvideo.config import ConfigError, check_parameters, drop_keys_without_effect, instantiate_from_config, to_plain
from satvideo.data.cache import check_caches
from satvideo.diffusion.discretization import noise_std
from satvideo.diffusion.samplers import Generators, randn
from satvideo.parallel.cfg import evaluate_halves
from satvideo.parallel.context_vae import decode_context_parallel, encode_context_parallel, gives_every_rank_a_chunk
from satvideo.vae.autoencoder import (LATENT_CHUNK_MULTIPLE, ORIGINAL_CHUNKS, check_chunk_frames, check_tiling,
                                      original_chunk_frames)
from satvideo.vae.regularizer import DiagonalGaussianRegularizer

logger = logging.getLogger(__name__)

CACHED_MOMENTS = "moments"  # batch key of VAE posterior moments cached by satvideo.data.cache

# The engine's frozen parts (the network's names inside the engine start with NETWORK_PREFIX).
FROZEN_PARTS = ("conditioner", "first_stage_model")


def build_vae(first_stage_config: dict) -> nn.Module:
    """The VAE, frozen and in eval mode, built from the RNG state of the call without advancing it: one without a
    weight file (tiny configs) comes out the same in training, precompute and sampling, whatever each builds
    besides it."""
    with torch.random.fork_rng(devices=[]):
        return instantiate_from_config(first_stage_config).eval().requires_grad_(False)


def build_frozen_parts(conditioner_config: dict, first_stage_config: dict) -> tuple[nn.Module, nn.Module]:
    """(text conditioner, VAE), frozen and in eval mode, each from the RNG state of the call (see build_vae)."""
    vae = build_vae(first_stage_config)
    with torch.random.fork_rng(devices=[]):
        conditioner = instantiate_from_config(conditioner_config).eval().requires_grad_(False)
    logger.info("built the frozen parts: text conditioner (%d parameters) and VAE (%d parameters)",
                sum(p.numel() for p in conditioner.parameters()), sum(p.numel() for p in vae.parameters()))
    return conditioner, vae


def place_frozen_parts(conditioner: nn.Module, vae: nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
    """The conditioner and the VAE (when there is one) on `device` in `dtype`, as the original casts every part.
    Under fp16, the modules a text encoder keeps in fp32 (transformers' `_keep_in_fp32_modules`: T5's `wo`, which
    overflows fp16) stay fp32."""
    for part in (conditioner, vae):
        if part is not None:
            part.to(device=device, dtype=dtype)
    if dtype != torch.float16:
        return
    for module in conditioner.modules():
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        for name, submodule in module.named_modules():
            if name.rsplit(".", 1)[-1] in keep:
                submodule.float()


def caption_dropout_rates(conditioner_config: dict) -> list[float]:
    """Each embedder's `ucg_rate` (0 when unset), as GeneralConditioner reads them."""
    return [float(config.get("ucg_rate", 0.0)) for config in to_plain(conditioner_config)["params"]["emb_models"]]


def posterior_regularizer(first_stage_config: dict) -> nn.Module:
    """The VAE's regularizer alone (a posterior draw or its mean, as configured), built as VideoAutoencoder builds it."""
    config = (to_plain(first_stage_config).get("params") or {}).get("regularizer_config")
    return instantiate_from_config(config) if config else DiagonalGaussianRegularizer()


class DiffusionModelWrapper(nn.Module):
    """Adapts the conditioner's output dict to the network's `context` argument; with `cfg_group` (a pair of ranks,
    sampling only) each rank evaluates one half of a guided batch (satvideo/parallel/cfg.py)."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.cfg_group = None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        if self.cfg_group is not None:
            return evaluate_halves(self.evaluate, self.cfg_group, x, timesteps, cond, **kwargs)
        return self.evaluate(x, timesteps, cond, **kwargs)

    def evaluate(self, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        return self.diffusion_model(x, timesteps, context=cond["crossattn"], **kwargs)


def trainable_filter(not_trainable_prefixes: list[str]) -> Callable[[str], bool]:
    """Network parameter name -> trainable?, as the original decides it.

    A prefix freezes the parameters whose name starts with it, written either as the engine sees them
    (`model.diffusion_model.transformer.layers.0`, the official form) or as network names
    (`transformer.layers.0`); `all` freezes everything. LoRA matrices are never frozen.
    """
    def is_trainable(name: str) -> bool:
        if is_lora_matrix(name):
            return True
        return not any(prefix == "all" or name.startswith(prefix) or (NETWORK_PREFIX + name).startswith(prefix)
                       for prefix in not_trainable_prefixes)
    return is_trainable


def check_encode_chunk_frames(vae: nn.Module, encode_chunk_frames: int | None) -> None:
    """`model.encode_chunk_frames` against the VAE's temporal compression, once the VAE is built and before anything
    is encoded (or a previous cache cleared)."""
    if encode_chunk_frames is not None:
        check_chunk_frames(encode_chunk_frames, vae.encoder.temporal_compress_times, "model.encode_chunk_frames")


def check_decode_args(args) -> None:
    """`args.decode_chunk_frames`, `args.vae_tiling` and `args.vae_tile_overlap`, checked before anything loads:
    a bad value would otherwise stop sampling, or a training run at its first validation, at the first decode."""
    if args.decode_chunk_frames not in (None, ORIGINAL_CHUNKS):
        check_chunk_frames(args.decode_chunk_frames, LATENT_CHUNK_MULTIPLE, "args.decode_chunk_frames")
    if args.vae_tiling is not None:
        check_tiling(args.vae_tiling, args.vae_tile_overlap, ("args.vae_tiling", "args.vae_tile_overlap"))


def check_prefixes_match(not_trainable_prefixes: list[str], names: list[str]) -> None:
    """A prefix that matches no network parameter and no frozen part is a ConfigError naming the closest one."""
    engine_names = [NETWORK_PREFIX + name for name in names] + list(FROZEN_PARTS)
    for prefix in not_trainable_prefixes:
        if prefix == "all" or any(name.startswith(prefix) for name in names + engine_names):
            continue
        if any(prefix.startswith(part) for part in FROZEN_PARTS):
            continue  # inside the T5 or VAE: frozen anyway
        candidates = {".".join(name.split(".")[:depth]) for name in names + engine_names
                      for depth in range(1, name.count(".") + 2)}
        close = difflib.get_close_matches(prefix, sorted(candidates), n=1)
        hint = f"; closest real prefix: {close[0]!r}" if close else ""
        raise ConfigError(f"model.not_trainable_prefixes: {prefix!r} matches no parameter{hint}")


class VideoDiffusionEngine(nn.Module):
    def __init__(
        self,
        network_config: dict,
        denoiser_config: dict,
        conditioner_config: dict,
        first_stage_config: dict,
        loss_fn_config: dict | None = None,
        sampler_config: dict | None = None,
        scale_factor: float = 1.0,
        not_trainable_prefixes: list[str] = ("first_stage_model", "conditioner"),
        noised_image_input: bool = False,
        noised_image_all_concat: bool = False,
        noised_image_dropout: float = 0.0,
        input_key: str = "mp4",
        latent_input: bool = False,
        encode_chunk_frames: int | None = None,
        checkpoint_activations: bool | None = None,
        cached_text_widths: list[int] | None = None,
    ):
        """`cached_text_widths`: the widths of a latent cache's text features, per embedder; given, the engine trains
        from that cache and builds no T5, nor a VAE unless the model is image-to-video (see the module docstring)."""
        super().__init__()
        if noised_image_input and latent_input:
            raise ConfigError("model.noised_image_input with model.latent_input: the first frame would have to be "
                              "a pixel image; give videos (latent_input: false) for image-to-video training")
        if noised_image_all_concat:
            raise ConfigError("model.noised_image_all_concat: only first-frame image conditioning is supported")
        # The sampler draws no random numbers: built first, its config is checked before T5's weights load.
        self.sampler = instantiate_from_config(sampler_config) if sampler_config else None
        # Frozen parts first, from the RNG state the network starts from too: stored outside nn.Module's
        # registries (see the module docstring).
        if cached_text_widths is None:
            conditioner, vae = build_frozen_parts(conditioner_config, first_stage_config)
            regularization = vae.regularization
        else:
            conditioner = CachedTextConditioner(cached_text_widths, caption_dropout_rates(conditioner_config))
            if noised_image_input:
                vae = build_vae(first_stage_config)
                regularization = vae.regularization
                logger.info("training from a latent cache: T5 is not built; the VAE (%d parameters) is, to encode "
                            "the noised conditioning frame at every step", sum(p.numel() for p in vae.parameters()))
            else:
                vae, regularization = None, posterior_regularizer(first_stage_config)
                logger.info("training from a latent cache: neither T5 nor the VAE is built")
        if vae is not None:
            check_encode_chunk_frames(vae, encode_chunk_frames)
        self.__dict__.update(conditioner=conditioner, first_stage_model=vae, regularization=regularization)
        network_config = to_plain(network_config)
        if checkpoint_activations is not None:
            network_config.setdefault("params", {})["checkpoint_activations"] = checkpoint_activations
        network = instantiate_from_config(network_config)
        freeze_network(network, list(not_trainable_prefixes))
        self.model = DiffusionModelWrapper(network)
        self.denoiser = instantiate_from_config(denoiser_config)
        self.loss_fn = instantiate_from_config(loss_fn_config) if loss_fn_config else None
        self.scale_factor = scale_factor
        self.noised_image_input = noised_image_input
        self.noised_image_dropout = noised_image_dropout
        self.input_key = input_key
        self.latent_input = latent_input
        self.encode_chunk_frames = encode_chunk_frames  # None: one pass, as the original
        self.encode_group = None  # set under sequence parallelism: see encode_first_stage
        self._said_encode_group = False
        self.patch_t = network.patch_t

    @classmethod
    def from_config(cls, model_config: DictConfig | dict, **overrides: Any) -> "VideoDiffusionEngine":
        """Build from the `model` section; official keys that only tune the original code are dropped and
        any other unknown key is an error naming the closest valid one."""
        params = {**drop_keys_without_effect("model", to_plain(model_config)), **overrides}
        check_parameters(cls, params, "model")
        return cls(**params)

    @classmethod
    def for_training(cls, config: DictConfig, args) -> "VideoDiffusionEngine":
        """The engine of a training run. With data.target CachedDataset (each cache checked against the config
        first) it builds no T5 and, for a text-to-video model, no VAE, unless validation videos need them; otherwise
        it builds both."""
        widths = check_caches(config, args)
        if widths is not None and args.eval_interval and args.validation_prompts:
            logger.info("validation videos (args.validation_prompts) need T5 and the VAE decoder: building them "
                        "for validation, although training reads the cache")
            widths = None
        return cls.from_config(config.model, checkpoint_activations=args.checkpoint_activations,
                               cached_text_widths=widths)

    @property
    def network(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def frozen_parts(self) -> list[nn.Module]:
        """The conditioner and, unless the engine trains from a cache, the VAE."""
        return [part for part in (self.conditioner, self.first_stage_model) if part is not None]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for part in self.frozen_parts:
            part._apply(fn)
        return self

    def place_frozen_parts(self, device: torch.device, dtype: torch.dtype) -> None:
        """T5 and the VAE on `device` in `dtype` (see the function place_frozen_parts)."""
        place_frozen_parts(self.conditioner, self.first_stage_model, device, dtype)

    # --- latents ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_first_stage(self, video: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """[B, T, 3, H, W] pixels in [-1, 1] -> [B, T', C, H/8, W/8] scaled latents.

        `sample`: a posterior draw or its mean; None follows the VAE's regularizer (`sample: true` by default,
        as the original trains; `first_stage_config.params.regularizer_config.params.sample: false` for the mean).
        With `model.encode_chunk_frames` the VAE encodes that many frames at a time (memory flat in the length),
        and, with `encode_group` (a sequence-parallel group, whose ranks all hold the same video and all call this),
        the chunks are encoded over its ranks when there are at least as many as ranks: the same latents, each rank
        running the encoder on 1/P of the chunks (satvideo/parallel/context_vae.py).
        """
        vae, chunk_frames = self.first_stage_model, self.encode_chunk_frames
        video = video.permute(0, 2, 1, 3, 4).to(next(vae.parameters()).dtype)  # [B, 3, T, H, W]
        group = self.encode_group
        if gives_every_rank_a_chunk(video.shape[2], chunk_frames, group):
            if not self._said_encode_group:
                logger.info("the VAE encodes each video's %d-frame chunks over the %d ranks of its sequence-parallel "
                            "group", chunk_frames, torch.distributed.get_world_size(group))
                self._said_encode_group = True
            latents = encode_context_parallel(vae, video, group, sample=sample, chunk_frames=chunk_frames)
        else:
            latents = vae.encode(video, sample=sample, chunk_frames=chunk_frames)
        return (latents * self.scale_factor).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def decode_first_stage(self, latents: torch.Tensor, chunk_frames: int | str | None = ORIGINAL_CHUNKS,
                           tile: int | None = None, overlap: int = 8, context_group=None) -> torch.Tensor:
        """[B, T', C, h, w] scaled latents -> [B, T, 3, H, W] pixels, `chunk_frames` latent frames at a time
        ("original": the original's chunks for T', see original_chunk_frames) and,
        with `tile`, `tile` x `tile` latent pixels at a time (see VideoAutoencoder.decode_tiled). With
        `context_group` (every rank of it calls this) the chunks are decoded over its ranks, with the same result,
        when there are at least as many chunks as ranks (satvideo/parallel/context_vae.py); chunk_frames None
        decodes in one pass on every rank."""
        vae_dtype = next(self.first_stage_model.parameters()).dtype
        z = (latents / self.scale_factor).permute(0, 2, 1, 3, 4).to(vae_dtype)  # [B, C, T', h, w]
        if chunk_frames == ORIGINAL_CHUNKS:
            chunk_frames = original_chunk_frames(z.shape[2])
        if not tile and gives_every_rank_a_chunk(z.shape[2], chunk_frames, context_group):
            return decode_context_parallel(self.first_stage_model, z, context_group,
                                           chunk_frames).permute(0, 2, 1, 3, 4).float()
        if tile:
            video = self.first_stage_model.decode_tiled(z, chunk_frames, tile, overlap)
        else:
            video = self.first_stage_model.decode(z, chunk_frames=chunk_frames)
        return video.permute(0, 2, 1, 3, 4).float()

    def pad_to_temporal_patch(self, latents: torch.Tensor) -> torch.Tensor:
        """Repeat the first latent frame until T' divides the temporal patch (1.5 models, [B, T', C, h, w])."""
        missing = (-latents.shape[1]) % self.patch_t
        return torch.cat([latents[:, :1].expand(-1, missing, -1, -1, -1), latents], dim=1) if missing else latents

    def image_condition(self, first_frame: torch.Tensor, num_latent_frames: int, noise_images: bool) -> torch.Tensor:
        """[B, 3, H, W] first frame -> [B, T', C, h, w]: its latent, followed by zero frames (image-to-video)."""
        image = first_frame[:, None]  # [B, 1, 3, H, W]
        if noise_images:  # noise augmentation of the conditioning frame, log-normal strength (as CogVideoX)
            sigma = torch.exp(torch.randn(image.shape[0], device=image.device) * 0.5 - 3.0)
            image = image + torch.randn_like(image) * sigma[:, None, None, None, None]
        latent = self.encode_first_stage(image, sample=None if noise_images else False)  # sampling: the mean
        padding = latent.new_zeros(latent.shape[0], num_latent_frames - 1, *latent.shape[2:])
        return torch.cat([latent, padding], dim=1)

    # --- training ----------------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict, training: bool) -> tuple[torch.Tensor, dict, dict]:
        """(latents [B, T', C, h, w], text conditioning, network inputs) of a batch {"mp4": [B, T, 3, H, W], "txt"}.

        Training draws latents from the VAE posterior, drops captions for guidance and noises and drops the
        conditioning frame as configured; otherwise (validation) everything is deterministic.
        """
        video = batch.get(self.input_key)
        if CACHED_MOMENTS in batch:  # VAE posterior moments [B, 2C, T', h, w] cached by satvideo.data.cache
            source = self if self.first_stage_model is None else self.first_stage_model
            dtype = next(source.parameters()).dtype  # the run's: frozen parts are cast to it
            z = self.regularization(batch[CACHED_MOMENTS].to(dtype), sample=None if training else False)
            latents = (z * self.scale_factor).permute(0, 2, 1, 3, 4).contiguous()
        elif self.latent_input:  # precomputed latents are unscaled VAE outputs, scaled here as the original does
            latents = video * self.scale_factor
        else:
            latents = self.encode_first_stage(video, sample=None if training else False)
        latents = self.pad_to_temporal_patch(latents)
        cond = self.conditioner(batch, drop_for_guidance=training)
        model_inputs = {}
        if self.noised_image_input:
            first_frame = batch["image"] if "image" in batch else video[:, 0]  # a manifest image or frame 0
            image = self.image_condition(first_frame, latents.shape[1], noise_images=training)
            if training and random.random() < self.noised_image_dropout:
                image = torch.zeros_like(image)
            model_inputs["concat_images"] = image
        cond = {key: value.to(latents.dtype) for key, value in cond.items()}
        _, frames, _, height, width = latents.shape
        patch = self.network.patch
        self.tokens_per_sample = frames // self.patch_t * (height // patch) * (width // patch) + cond["crossattn"].shape[1]
        return latents, cond, model_inputs

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean diffusion loss of a training batch {"mp4": [B, T, 3, H, W], "txt": [B] prompts}."""
        latents, cond, model_inputs = self.prepare_batch(batch, training=True)
        return self.loss_fn(self.model, self.denoiser, cond, latents, **model_inputs).mean()

    @torch.no_grad()
    def validation_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Mean loss of a batch at timesteps and noise drawn from `generator`: the same for every evaluation."""
        latents, cond, model_inputs = self.prepare_batch(batch, training=False)
        return self.loss_fn(self.model, self.denoiser, cond, latents, generator=generator, **model_inputs).mean()

    # --- sampling ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> tuple[dict, dict]:
        """(cond, uncond) text features of prompts [B]. The unconditional input is all zeros, as the original
        samples, except where a non-empty negative prompt replaces it with that prompt's features."""
        dtype = next(self.parameters()).dtype
        cond = {key: value.to(dtype) for key, value in self.conditioner({"txt": prompts}).items()}
        uncond = self.conditioner.unconditional(cond)
        negatives = [(i, text) for i, text in enumerate(negative_prompts or []) if text]
        if negatives:
            encoded = self.conditioner({"txt": [text for _, text in negatives]})
            rows = torch.tensor([i for i, _ in negatives])
            for key, value in encoded.items():
                uncond[key][rows.to(value.device)] = value.to(dtype)
        return cond, uncond

    @torch.no_grad()
    def sample(self, prompts: list[str], latent_shape: tuple[int, int, int, int], generator: Generators,
               first_frames: torch.Tensor | None = None, negative_prompts: list[str] | None = None,
               text: tuple[dict, dict] | None = None, init_latents: torch.Tensor | None = None, strength: float = 1.0,
               prefix_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Generate latents [B, T', C, h, w] for prompts; `latent_shape` = (T', C, h, w) before temporal padding.

        - `first_frames` [B, 3, H, W]: the conditioning frame of image-to-video models.
        - `negative_prompts` (or `text`, precomputed `encode_prompts` output): the unconditional branch of CFG.
        - `init_latents` [B, T', C, h, w] with `strength` in [0, 1]: video-to-video (SDEdit): the latents are noised
          to the level of step round((1 - strength) * steps) and denoised from there; 0 returns them, 1 is
          text-to-video from the same noise.
        - `prefix_latents` [B, k, C, h, w]: continuation: the first k latent frames stay these throughout.
        A list of generators, one per prompt, makes each video's noise depend on its own seed only.
        """
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        frames, channels, height, width = latent_shape
        pad = (-frames) % self.patch_t  # 1.5 models: frames added in front (as training repeats the first)
        cond, uncond = text if text is not None else self.encode_prompts(prompts, negative_prompts)
        model_inputs = {}
        if first_frames is not None and not self.noised_image_input:
            raise ValueError("this is a text-to-video model (model.noised_image_input is false): it takes no first frame")
        if self.noised_image_input:
            if first_frames is None:
                raise ValueError("this is an image-to-video model: give a first frame for each prompt")
            model_inputs["concat_images"] = self.image_condition(first_frames.to(device, dtype), frames + pad,
                                                                 noise_images=False)
        # The sampling state is fp32 whatever the network's precision, from the first noise draw on (as the original)
        x = randn((len(prompts), frames + pad, channels, height, width), generator, device, torch.float32)

        start, fixed = 0, 0
        if init_latents is not None:
            start, x = self.noised_to_strength(init_latents.to(device, torch.float32), x, strength, pad)
            if start is None:
                return init_latents
        if prefix_latents is not None:
            prefix = prefix_latents.to(device, torch.float32)
            x[:, :pad] = prefix[:, :1]
            x[:, pad : pad + prefix.shape[1]] = prefix
            fixed = pad + prefix.shape[1]

        def denoise(x: torch.Tensor, sigma: torch.Tensor, c: dict, **kwargs) -> torch.Tensor:
            return self.denoiser(self.model, x, sigma, c, **model_inputs, **kwargs)

        latents = self.sampler(denoise, x, cond, uc=uncond, generator=generator, start=start, fixed_frames=fixed)
        return latents[:, pad:]  # drop the frames added for the temporal patch

    def noised_to_strength(self, latents: torch.Tensor, noise: torch.Tensor, strength: float,
                           pad: int) -> tuple[int | None, torch.Tensor]:
        """(first step, latents noised to its level) for video-to-video; (None, latents) when strength is 0."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        timesteps, alphas = self.sampler.schedule()
        start = len(timesteps) - round(strength * len(timesteps))
        if start == len(timesteps):
            return None, latents
        padded = torch.cat([latents[:, :1].expand(-1, pad, -1, -1, -1), latents], dim=1)
        alpha = alphas[start].to(noise.dtype)
        return start, alpha * padded + noise_std(alpha) * noise


def freeze_network(network: nn.Module, not_trainable_prefixes: list[str]) -> None:
    """Set requires_grad from `model.not_trainable_prefixes` and log the trainable and frozen counts."""
    names = [name for name, _ in network.named_parameters()]
    check_prefixes_match(not_trainable_prefixes, names)
    is_trainable = trainable_filter(not_trainable_prefixes)
    counts = {True: 0, False: 0}
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(is_trainable(name))
        counts[parameter.requires_grad] += parameter.numel()
    logger.info("network parameters: %d trainable, %d frozen (not_trainable_prefixes %s)",
                counts[True], counts[False], not_trainable_prefixes)
