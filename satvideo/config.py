"""Configuration: YAML files merged in order, `key=value` overrides, and `target`/`params` instantiation.

A run is described by sections `args` (run options, validated against `ARGS_DEFAULTS`), `model`, `data` and
`deepspeed`. Targets written for the official CogVideoX SAT code (`dit_video_concat.*`, `sgm.*`,
`vae_modules.*`, `data_video.*`) resolve to satvideo classes through `LEGACY_TARGETS`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Every key the `args` section may hold, with its default. Official CogVideoX configs use these names too.
ARGS_DEFAULTS: dict[str, Any] = {
    # run
    "experiment_name": "satvideo",
    "seed": 1234,
    "device": None,  # None: cuda when available, else cpu
    # training length, logging, checkpoints
    "train_iters": 1000,
    "log_interval": 10,
    "save_interval": 500,
    "save": None,  # a run folder; restarting with the same folder resumes from its `latest`
    "load": None,  # weights to start from when `save` has no checkpoint yet
    "no_load_rng": False,
    "strict_load": True,
    # optimisation (lr, betas, weight decay live in the `deepspeed.optimizer` section)
    "lr_decay_style": "cosine",  # constant | linear | cosine
    "warmup": 0.01,  # fraction of train_iters when < 1, else a number of iterations
    "lr_decay_iters": None,  # None: train_iters
    "min_lr_ratio": 0.0,
    "checkpoint_activations": False,
    "zero_stage": None,  # overrides deepspeed.zero_optimization.stage
    "fp16": False,
    "bf16": False,
    # data
    "train_data": None,
    "num_workers": 2,
    "batch_size": None,  # micro-batch per GPU; None: deepspeed.train_micro_batch_size_per_gpu, else 1
    # logging backends
    "wandb": False,
    "wandb_project": "satvideo",
    # sampling
    "input_type": "txt",  # txt | cli
    "input_file": None,
    "output_dir": "outputs",
    "sampling_num_frames": None,  # latent frames; None: from the model config
    "sampling_image_size": None,  # [H, W] in pixels; None: from the model config
    "sampling_fps": 8,
    "latent_channels": 16,
    "image2video": False,
    "num_samples": 1,
    "decode_chunk_frames": 2,
    # Accepted so that official CogVideoX configs load unchanged; no effect here (there is no validation loop,
    # model parallelism is 1, and the entrypoint itself decides between training and sampling).
    "mode": "finetune",
    "model_parallel_size": 1,
    "eval_interval": None,
    "eval_iters": 1,
    "eval_batch_size": 1,
    "valid_data": None,
    "split": "1,0,0",
    "force_train": False,
    "force_inference": False,
    "only_log_video_latents": False,
}


SECTIONS = ("args", "model", "data", "deepspeed")


class ConfigError(ValueError):
    """A configuration problem, reported with the file or key it comes from."""


def load_config(base: Iterable[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge YAML files in order, apply `key=value` overrides, and validate the `args` section."""
    configs = []
    for path in base:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            configs.append(OmegaConf.load(path))
        except Exception as error:  # omegaconf raises several YAML error types
            raise ConfigError(f"cannot parse config file {path}: {error}") from error
    config = OmegaConf.merge(*configs) if configs else OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        section = item.split("=", 1)[0].split(".", 1)[0]
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        try:  # keys may index lists: model.conditioner_config.params.emb_models.0.params.model_dir=...
            config.merge_with_dotlist([item])
        except OmegaConfBaseException as error:
            raise ConfigError(f"cannot apply override {item!r}: {error}") from error
    config.args = _validated_args(config.get("args") or OmegaConf.create())
    return config


def _validated_args(args: DictConfig) -> DictConfig:
    for key in args:
        if key not in ARGS_DEFAULTS:
            close = difflib.get_close_matches(str(key), ARGS_DEFAULTS, n=1)
            hint = f"; did you mean args.{close[0]}?" if close else ""
            raise ConfigError(f"unknown key args.{key}{hint}")
    return OmegaConf.merge(OmegaConf.create(ARGS_DEFAULTS), args)


def args_namespace(config: DictConfig) -> argparse.Namespace:
    """The validated `args` section as a namespace, the form entrypoints and SAT expect."""
    return argparse.Namespace(**OmegaConf.to_container(config.args, resolve=True))


# Official CogVideoX SAT target -> satvideo target. One table: add a line to support another name.
LEGACY_TARGETS: dict[str, str] = {
    "dit_video_concat.DiffusionTransformer": "satvideo.dit.DiffusionTransformer",
    "dit_video_concat.Basic3DPositionEmbeddingMixin": "satvideo.dit.SinCos3DPositionMixin",
    "dit_video_concat.Rotary3DPositionEmbeddingMixin": "satvideo.dit.Rotary3DPositionMixin",
    "dit_video_concat.ImagePatchEmbeddingMixin": "satvideo.dit.PatchEmbedMixin",
    "dit_video_concat.AdaLNMixin": "satvideo.dit.AdaLNMixin",
    "dit_video_concat.FinalLayerMixin": "satvideo.dit.FinalLayerMixin",
    "dit_video_concat.SwiGLUMixin": "satvideo.dit.SwiGLUMixin",
    "sgm.modules.GeneralConditioner": "satvideo.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": "satvideo.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenT5Embedder": "satvideo.conditioner.FrozenT5Embedder",
    "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser": "satvideo.diffusion.DiscreteDenoiser",
    "sgm.modules.diffusionmodules.denoiser_scaling.VideoScaling": "satvideo.diffusion.VideoScaling",
    "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting": "satvideo.diffusion.EpsWeighting",
    "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization": "satvideo.diffusion.ZeroSNRDDPMDiscretization",
    "sgm.modules.diffusionmodules.loss.VideoDiffusionLoss": "satvideo.diffusion.VideoDiffusionLoss",
    "sgm.modules.diffusionmodules.sigma_sampling.DiscreteSampling": "satvideo.diffusion.DiscreteSampling",
    "sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler": "satvideo.diffusion.VPSDEDPMPP2MSampler",
    "sgm.modules.diffusionmodules.sampling.VPODEDPMPP2MSampler": "satvideo.diffusion.VPODEDPMPP2MSampler",
    "sgm.modules.diffusionmodules.sampling.VideoDDIMSampler": "satvideo.diffusion.VideoDDIMSampler",
    "sgm.modules.diffusionmodules.guiders.VanillaCFG": "satvideo.diffusion.VanillaCFG",
    "sgm.modules.diffusionmodules.guiders.DynamicCFG": "satvideo.diffusion.DynamicCFG",
    "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper": "satvideo.vae.VideoAutoencoder",
    "vae_modules.cp_enc_dec.ContextParallelEncoder3D": "satvideo.vae.ContextParallelEncoder3D",
    "vae_modules.cp_enc_dec.ContextParallelDecoder3D": "satvideo.vae.ContextParallelDecoder3D",
    "vae_modules.regularizers.DiagonalGaussianRegularizer": "satvideo.vae.DiagonalGaussianRegularizer",
    "data_video.SFTDataset": "satvideo.data.SFTDataset",
}

_LEGACY_PREFIXES = ("dit_video_concat.", "sgm.", "vae_modules.", "data_video.")


def resolve_target(target: str) -> str:
    """Map an official CogVideoX target to its satvideo class; other targets pass through."""
    if target in LEGACY_TARGETS:
        return LEGACY_TARGETS[target]
    if target.startswith(_LEGACY_PREFIXES):
        close = difflib.get_close_matches(target, LEGACY_TARGETS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"target {target!r} of the official CogVideoX code has no satvideo counterpart{hint}")
    return target


def get_obj_from_str(target: str) -> Any:
    """Import `package.module.Name` (after alias resolution) and return `Name`."""
    target = resolve_target(target)
    module_name, _, attribute = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"target {target!r} is not a dotted path 'module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"cannot import module {module_name!r} for target {target!r}: {error}") from error
    if not hasattr(module, attribute):
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r} (target {target!r})")
    return getattr(module, attribute)


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts and lists; anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def instantiate_from_config(config: dict | DictConfig, **extra_kwargs: Any) -> Any:
    """Build `target(**params, **extra_kwargs)` from a `{target, params}` config."""
    config = to_plain(config)
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got {config!r}")
    params = dict(config.get("params") or {})
    params.update(extra_kwargs)
    return get_obj_from_str(config["target"])(**params)
