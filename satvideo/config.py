"""Configuration: YAML files merged in order, `key=value` overrides, and `target`/`params` instantiation.

A run is described by sections `args` (run options, validated against `ARGS_DEFAULTS`), `model`, `data` and
`deepspeed`. Targets written for the official CogVideoX SAT code (`dit_video_concat.*`, `sgm.*`,
`vae_modules.*`, `data_video.*`) resolve to satvideo classes through `LEGACY_TARGETS`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Every key the `args` section may hold, with its default. Official CogVideoX configs use these names too.
ARGS_DEFAULTS: dict[str, Any] = {
    # run
    "experiment_name": "satvideo",
    "mode": "pretrain",  # SAT's modes; "finetune" adds SAT's auto warm-up (100 iterations at 5% of the lr)
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
    "keep_last": None,  # keep only the newest N checkpoints in `save` (None: all)
    "max_nonfinite_steps": 10,  # skipped optimizer steps in a row (non-finite loss or gradients) that stop the run
    "lock_timeout": 900,  # seconds without a heartbeat after which another host's lock on `save` counts as stale
    # validation: every eval_interval iterations, the loss on valid_data and videos of validation_prompts
    "eval_interval": None,
    "eval_iters": 1,
    "eval_batch_size": 1,
    "valid_data": None,
    "validation_prompts": None,  # a list of prompts, or a text file with one per line; seeds args.seed + i
    # EMA of the trainable weights, saved as {save}/{iteration}-ema/ (SAT layout) and resumed exactly
    "ema_decay": None,
    "use_ema": False,  # sampling: load the EMA weights of the checkpoint
    "validate_ema": False,  # training: validation also measures the EMA weights and samples its videos with them
    # LoRA adapters at sampling: the base checkpoint (default: the one the run started from) and the scale
    "lora_base": None,
    "lora_scale": 1.0,
    # optimisation (lr, betas, weight decay live in the `deepspeed.optimizer` section); SAT's schedule and defaults
    "lr_decay_style": "linear",  # constant | linear | cosine | exponential (SAT: exponential is constant)
    "warmup": 0.01,  # fraction of lr_decay_iters when < 1, else a number of iterations
    "lr_decay_iters": None,  # None: train_iters
    "lr_decay_ratio": 0.1,  # cosine decays to lr * lr_decay_ratio
    "checkpoint_activations": None,  # None: model.network_config.params.transformer_args decides
    "compile": False,  # regional torch.compile of the transformer layers' element-wise parts (training and sampling)
    "zero_stage": None,  # overrides deepspeed.zero_optimization.stage
    "sequence_parallel_size": 1,  # ranks that share one video's tokens (satvideo/parallel/sequence.py)
    "cfg_parallel_size": 1,  # sampling: 2 runs the conditional and unconditional branches on two ranks
    "fp16": False,
    "bf16": False,
    # data
    "train_data": None,
    "train_data_weights": None,  # one per train_data path: source i takes int(len_i * w_i) slots (SAT's semantics)
    "num_workers": 2,
    "pin_memory": True,  # page-locked batches (CUDA only), copied to the GPU without blocking
    "prefetch_factor": 2,  # batches each data worker prepares ahead
    "batch_size": None,  # micro-batch per GPU; None: deepspeed.train_micro_batch_size_per_gpu, else 1
    # logging backends
    "wandb": False,
    "wandb_project": "satvideo",
    # sampling
    "input_type": "txt",  # txt | cli
    "input_file": None,
    "output_dir": "outputs",
    "sampling_num_frames": None,  # latent frames (1.5: including the first, dropped at decoding); None: model config
    "sampling_image_size": None,  # [H, W] in pixels; None: from the model config (1.5-I2V: from the image)
    "sampling_fps": 8,
    "latent_channels": 16,
    "image2video": False,
    "num_samples": 1,
    # latent frames decoded at a time: "original" chooses the original's chunks for each video (2 frames at 49 and
    # 81 frames, 4 at 161); a number fixes them (2 keeps decode memory flat in the length); null: one pass
    "decode_chunk_frames": "original",
    "vae_tiling": None,  # decode tiles of this many latent pixels square (e.g. 32: 256 px) to bound memory
    "vae_tile_overlap": 8,  # latent pixels shared by neighbouring tiles, blended
    "only_save_latents": False,  # write the sampled latents (safetensors) instead of decoding them
    "negative_prompt": "",  # for every prompt without its own (JSONL); empty: the all-zero unconditional input
    "overwrite": False,  # replace files of an earlier run in output_dir instead of taking new names
    "contact_sheet": False,  # a PNG of frames beside each mp4
    "lora": None,  # sampling: adapters merged over `load`: paths (satvideo checkpoints or diffusers files) or {path, scale}
    "offload_text_encoder": True,  # sampling: T5 goes to the CPU once every prompt is encoded
}

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")


def is_whole_number(value: object) -> bool:
    """An int from a config, not a bool (YAML's `true` is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# A rule for a config value: (test, what the error says is expected).
Rule = tuple[Callable[[Any], bool], str]


def whole_rule(minimum: int, maximum: int | None = None) -> Rule:
    def test(value):
        return is_whole_number(value) and value >= minimum and (maximum is None or value <= maximum)
    return test, f"a whole number >= {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"


def number_rule(minimum: float, maximum: float | None = None, exclusive: bool = False) -> Rule:
    def test(value):
        return (is_number(value) and (value > minimum if exclusive else value >= minimum)
                and (maximum is None or value <= maximum))
    bound = f"> {minimum}" if exclusive else f">= {minimum}"
    return test, f"a number {bound}" + (f" and <= {maximum}" if maximum is not None else "")


def choice_rule(*choices: Any) -> Rule:
    """One of `choices`, of the same type (2.0 is not the ZeRO stage 2)."""
    def test(value):
        return any(value == choice and type(value) is type(choice) for choice in choices)
    return test, f"one of {', '.join(map(str, choices))}"


def nullable(rule: Rule) -> Rule:
    test, expected = rule
    return (lambda value: value is None or test(value)), f"{expected} (or null)"


def check_value(name: str, value: Any, rule: Rule) -> None:
    """ConfigError `name=value: expected ...` unless `value` passes `rule`."""
    test, expected = rule
    if not test(value):
        raise ConfigError(f"{name}={value!r}: expected {expected}")


BOOLEAN: Rule = (lambda value: isinstance(value, bool), "true or false")
TEXT: Rule = (lambda value: isinstance(value, str), "a string")
FINITE_NUMBER: Rule = (lambda value: is_number(value) and math.isfinite(value), "a finite number")
FRAMES_4K_PLUS_1: Rule = (lambda value: is_whole_number(value) and value >= 1 and value % 4 == 1,
                          "4k+1 frames for the causal VAE (1, 5, 9, ...)")
PIXEL_SIZE: Rule = (lambda value: isinstance(value, (list, tuple, ListConfig)) and len(value) == 2
                    and all(is_whole_number(side) and side > 0 for side in value), "[height, width] in pixels")

# What each `args` value must be, checked when the config loads, so that a bad value fails before any data or
# weight is read. Keys not listed are paths and strings, or are checked where their meaning is known
# (decode_chunk_frames and the VAE tiling with the VAE, train_data_weights with the sources).
ARGS_RULES: dict[str, Rule] = {
    "mode": choice_rule("pretrain", "finetune", "inference"),
    "seed": whole_rule(0, 2**32 - 1),  # numpy's range
    "train_iters": whole_rule(1), "log_interval": whole_rule(1), "save_interval": whole_rule(1),
    "keep_last": nullable(whole_rule(1)), "max_nonfinite_steps": whole_rule(1),
    "lock_timeout": number_rule(0, exclusive=True),
    "eval_interval": nullable(whole_rule(1)), "eval_iters": whole_rule(1), "eval_batch_size": whole_rule(1),
    "ema_decay": nullable((lambda value: is_number(value) and 0 < value < 1, "a number between 0 and 1, e.g. 0.9999")),
    "lora_scale": FINITE_NUMBER,
    "lr_decay_style": choice_rule(*DECAY_STYLES), "warmup": number_rule(0), "lr_decay_iters": nullable(whole_rule(1)),
    "lr_decay_ratio": number_rule(0, 1),
    "zero_stage": nullable(choice_rule(0, 1, 2, 3)), "sequence_parallel_size": whole_rule(1),
    "cfg_parallel_size": choice_rule(1, 2),
    "num_workers": whole_rule(0), "prefetch_factor": whole_rule(1), "batch_size": nullable(whole_rule(1)),
    "input_type": choice_rule("txt", "cli"), "sampling_num_frames": nullable(whole_rule(1)),
    "sampling_image_size": nullable(PIXEL_SIZE), "sampling_fps": number_rule(0, exclusive=True),
    "latent_channels": whole_rule(1), "num_samples": whole_rule(1),
    **{key: BOOLEAN for key, default in ARGS_DEFAULTS.items() if isinstance(default, bool)},
}

# `args` keys people write that live in another section.
MOVED_ARGS = {"lr": "deepspeed.optimizer.params.lr", "weight_decay": "deepspeed.optimizer.params.weight_decay",
              "gradient_clipping": "deepspeed.gradient_clipping",
              "train_micro_batch_size_per_gpu": "args.batch_size (or deepspeed.train_micro_batch_size_per_gpu)"}


# Keys of the official CogVideoX SAT configs that change nothing in satvideo, by section or by the satvideo
# target they are given to. They are dropped before use and logged once; any other unknown key is an error.
OFFICIAL_KEYS_WITHOUT_EFFECT: dict[str, frozenset[str]] = {
    # model parallelism is 1; the entrypoint itself decides training vs sampling; validation videos are decoded
    "args": frozenset({"model_parallel_size", "split", "force_train", "force_inference", "only_log_video_latents"}),
    # autocast and logging switches of the original engine, per-call VAE batch limits, LoRA flags read elsewhere;
    # `augmentation_dropout` (1.5-I2V) is never read by the original either
    "model": frozenset({"disable_first_stage_autocast", "log_keys", "en_and_decode_n_samples_a_time", "lr_scale",
                        "use_lora", "compile_model", "augmentation_dropout"}),
    # fp16 loss-scaling keys written at the top level, where DeepSpeed does not read them (they belong in `fp16`)
    "deepspeed": frozenset({"loss_scale", "loss_scale_window", "hysteresis", "min_loss_scale"}),
    # class-conditional and model-parallel variants only
    "satvideo.dit.DiffusionTransformer": frozenset({"adm_in_channels", "parallel_output", "zero_init_y_embed"}),
    # context parallelism is not used; the VAE's training loss is not part of the diffusion model
    "satvideo.vae.VideoAutoencoder": frozenset({"cp_size", "loss_config", "monitor", "input_key"}),
    "satvideo.vae.ContextParallelEncoder3D": frozenset({"resolution", "gather_norm", "out_ch", "pad_mode"}),
    "satvideo.vae.ContextParallelDecoder3D": frozenset({"resolution", "gather_norm", "in_channels", "double_z",
                                                        "pad_mode"}),
    # the engine passes the model inputs itself
    "satvideo.diffusion.VideoDiffusionLoss": frozenset({"batch2model_keys"}),
}

# Top-level keys of a DeepSpeed config (DeepSpeed checks the sub-sections itself).
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "wall_clock_breakdown", "memory_breakdown", "dump_state", "flops_profiler", "comms_logger", "tensorboard",
    "wandb", "csv_monitor", "comet", "aio", "checkpoint", "data_types", "communication_data_type",
    "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "disable_allgather", "dataloader_drop_last", "elasticity", "autotuning", "compression_training",
    "data_efficiency", "curriculum_learning", "pipeline", "hybrid_engine", "compile", "timers",
    "use_data_before_expert_parallelism", "graph_harvesting", "eigenvalue", "progressive_layer_drop",
    "sparse_attention", "weight_quantization", "nebula", "use_node_local_storage", "load_universal_checkpoint",
})

logger = logging.getLogger(__name__)
_logged_ignored: set[str] = set()


def drop_keys_without_effect(where: str, mapping: dict, label: str | None = None) -> dict:
    """`mapping` without the official keys listed for `where`; each dropped key is logged once per process."""
    ignored = OFFICIAL_KEYS_WITHOUT_EFFECT.get(where, frozenset())
    for key in sorted(ignored.intersection(mapping)):
        name = f"{label or where}.{key}"
        if name not in _logged_ignored:
            _logged_ignored.add(name)
            logger.info("%s: official key without effect in satvideo, ignored", name)
    return {key: value for key, value in mapping.items() if key not in ignored}


def unknown_key_error(key: str, where: str, valid: Iterable[str]) -> "ConfigError":
    """`unknown key <where>.<key>; did you mean <where>.<closest>?`"""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f"; did you mean {where}.{close[0]}?" if close else ""
    return ConfigError(f"unknown key {where}.{key}{hint}")


SECTIONS = ("args", "model", "data", "deepspeed")
PART_KEYS = ("target", "params")  # the keys of a `{target, params}` part


class SatvideoError(Exception):
    """An error of satvideo's own, reported by the entrypoints as one line (the traceback with --debug)."""


class ConfigError(SatvideoError, ValueError):
    """A configuration problem, reported with the file or key it comes from."""


class TrainingError(SatvideoError):
    """A run that must stop: non-finite losses in a row, non-finite weights, a run folder in use."""


class CheckpointError(SatvideoError):
    """A checkpoint file that cannot or must not be read (it would execute code, or it is damaged)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist or holds no model states."""


def load_config(base: Iterable[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge YAML files in order, apply `key=value` overrides, and validate the `args` section."""
    config = OmegaConf.create()
    for path in base:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:  # omegaconf raises several YAML error types
            raise ConfigError(f"cannot parse config file {path}: {yaml_problem(error)}") from error
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path}: expected sections ({', '.join(SECTIONS)}) at the top, found a list")
        clash = _container_clash(config, loaded)
        if clash:
            raise ConfigError(f"config file {path}: {clash}")
        config = OmegaConf.merge(config, loaded)
        _last_precision_wins(config, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        section = item.split("=", 1)[0].split(".", 1)[0]
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        try:  # keys may index lists: model.conditioner_config.params.emb_models.0.params.model_dir=...
            config.merge_with_dotlist([item])
            if section == "args":
                _last_precision_wins(config, OmegaConf.from_dotlist([item]), f"override {item!r}")
        except OmegaConfBaseException as error:
            raise ConfigError(f"cannot apply override {item!r}: {error}") from error
        except yaml.YAMLError as error:  # the value is parsed as YAML: `[shards-{0..9}.tar]` needs quotes
            raise ConfigError(f"cannot apply override {item!r}: {yaml_problem(error)}; quote a value that holds "
                              "braces, commas or colons ('...')") from error
    for section in config:
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown section {section!r} (expected {', '.join(SECTIONS)}){hint}")
        value = config.get(section)
        if value is not None and not isinstance(value, DictConfig):
            raise ConfigError(f"section {section}: expected a mapping of keys, found {to_plain(value)!r}")
    config.args = _validated_args(config.get("args") or OmegaConf.create())
    if "deepspeed" in config:
        config.deepspeed = _validated_deepspeed(config.deepspeed)
    return config


def _container_clash(base: DictConfig, update: DictConfig, prefix: str = "") -> str | None:
    """Where `update` gives a list for a mapping of `base`, or a mapping for a list, which OmegaConf cannot merge:
    `key: expected a mapping (as in the files before), found a list`; None when they merge."""
    known = dict(base.items_ex(resolve=False))
    for key, value in update.items_ex(resolve=False):
        before = known.get(key)
        if isinstance(before, DictConfig) and isinstance(value, DictConfig):
            clash = _container_clash(before, value, f"{prefix}{key}.")
            if clash:
                return clash
        elif isinstance(before, (DictConfig, ListConfig)) and isinstance(value, (DictConfig, ListConfig)) \
                and type(before) is not type(value):
            expected, found = ("a mapping", "a list") if isinstance(before, DictConfig) else ("a list", "a mapping")
            return f"{prefix}{key}: expected {expected} (as in the files before), found {found}"
    return None


def yaml_problem(error: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def _last_precision_wins(config: DictConfig, source: DictConfig, where: str) -> None:
    """A file or override that turns args.fp16 on turns args.bf16 off, and the other way round: the family configs
    state each model's precision and a later file or the command line may change it."""
    args = source.get("args") if isinstance(source, DictConfig) else None
    if not isinstance(args, DictConfig):
        return
    enabled = [flag for flag in ("fp16", "bf16") if args.get(flag) is True]
    if len(enabled) == 2:
        raise ConfigError(f"{where}: args.fp16 and args.bf16 are both true; choose one")
    if enabled:
        config.args["bf16" if enabled[0] == "fp16" else "fp16"] = False


def _validated_args(args: DictConfig) -> DictConfig:
    args = drop_keys_without_effect("args", to_plain(args))
    for key in args:
        if key in MOVED_ARGS:
            raise ConfigError(f"unknown key args.{key}; it is set as {MOVED_ARGS[key]}")
        if key not in ARGS_DEFAULTS:
            raise unknown_key_error(key, "args", ARGS_DEFAULTS)
        if key in ARGS_RULES:
            check_value(f"args.{key}", args[key], ARGS_RULES[key])
    return OmegaConf.merge(OmegaConf.create(ARGS_DEFAULTS), args)


def _validated_deepspeed(section: DictConfig) -> DictConfig:
    section = drop_keys_without_effect("deepspeed", to_plain(section))
    for key in section:
        if key not in DEEPSPEED_KEYS:
            raise unknown_key_error(key, "deepspeed", DEEPSPEED_KEYS)
    return OmegaConf.create(section)


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
    """Build `target(**params, **extra_kwargs)` from a `{target, params}` config.

    Official keys without effect for the target are dropped (OFFICIAL_KEYS_WITHOUT_EFFECT); any other
    parameter the target does not take is an error naming it and the closest parameter it does take.
    """
    config = to_plain(config)
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got {config!r}")
    for key in config:
        if key not in PART_KEYS:  # e.g. `parmas`: never built silently with the defaults
            raise unknown_key_error(key, f"{config['target']} config", PART_KEYS)
    target = resolve_target(config["target"])
    params = drop_keys_without_effect(target, dict(config.get("params") or {}), label=f"{target} params")
    params.update(extra_kwargs)
    factory = get_obj_from_str(target)
    check_parameters(factory, params, f"{config['target']} params")
    return factory(**params)


def check_parameters(factory: Callable, params: dict, where: str) -> None:
    """Raise ConfigError for a key of `params` that `factory` does not accept (unless it takes **kwargs)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: let the call itself check
        return
    parameters = signature.parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return
    accepted = [parameter.name for parameter in parameters
                if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in params:
        if key not in accepted:
            raise unknown_key_error(key, where, accepted)
