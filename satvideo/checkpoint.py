"""Checkpoints in the SwissArmyTransformer layout, readable by the official tools.

    {save}/{iteration}/mp_rank_00_model_states.pt   {"module": state dict with model.diffusion_model.* keys, ...}
    {save}/{iteration}/zero_pp_rank_*_optim_states.pt  optimizer shards (DeepSpeed ZeRO), for exact resume
    {save}/latest                                   the newest complete iteration, as text

`latest` is replaced atomically and only after every rank has finished writing, so an interrupted save never
becomes the checkpoint a resumed run starts from. LoRA runs save only the adapter matrices (plus their rank,
alpha, target modules and base checkpoint under `lora`); EMA weights go to `{save}/{iteration}-ema/`.

Nothing read from disk can execute code: every file goes through `safe_load` (torch's weights-only unpickler,
plus an explicit allow-list of the plain-data classes DeepSpeed and SAT pickle into their files).
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from satvideo.atomic_files import write_text_atomically
from satvideo.config import CheckpointError, CheckpointNotFound

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_RANK0_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
NETWORK_PREFIX = "model.diffusion_model."
# Keys of official checkpoints that satvideo recomputes or keeps elsewhere: frozen T5 and VAE weights,
# SAT's unused token/position embeddings, RoPE and sin-cos tables.
IGNORED_PREFIXES = ("conditioner.", "first_stage_model.")
IGNORED_NETWORK_KEYS = ("transformer.word_embeddings.weight", "transformer.position_embeddings.weight",
                        "mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos")

LORA_METADATA = "lora"
# words of the line that says why torch's weights-only unpickler refused a file
UNPICKLER_REASONS = ("Unsupported", "GLOBAL", "allowlisted")
# what torch says of a file cut short or damaged: its zip reader, or a pickle that ends early
DAMAGED_FILE_SIGNS = ("PytorchStreamReader failed", "pickle data was truncated", "Ran out of input", "corrupted")

logger = logging.getLogger(__name__)


def checkpoint_safe_globals() -> list:
    """What DeepSpeed and SAT pickle into their checkpoint files beside the tensors: DeepSpeed's loss scalers, ZeRO
    stage enum and flat-partition addresses, and NumPy's random state, which SAT saves unless --no-save-rng (an
    array; its elements go through the same weights-only unpickler). Plain data, allowed by name on top of torch's
    weights-only defaults; NumPy 1.x and 2.x pickle `_reconstruct` under different module names."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype,
            type(np.dtype(np.uint32)), *((reconstruct, f"{module}.multiarray._reconstruct")
                                         for module in ("numpy._core", "numpy.core"))]


def safe_load(path: str | Path, map_location: Any = "cpu", allowed: Iterable = (), mmap: bool = False) -> Any:
    """torch.load with the weights-only unpickler (tensors, containers, numbers, strings and `allowed` classes);
    a file holding anything else, which could execute code, is a CheckpointError naming it. `mmap` maps the
    tensors instead of reading them (for a look at a large file's metadata)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError as error:
        raise CheckpointNotFound(f"{path} does not exist") from error
    except IsADirectoryError as error:
        raise CheckpointError(f"{path}: refused to load: a folder, not a file") from error
    except Exception as error:  # whatever a file that is not torch's makes the unpickler raise (KeyError, ...)
        reason = str(error).strip().splitlines()
        if any(sign in " ".join(reason) for sign in DAMAGED_FILE_SIGNS) or isinstance(error, (EOFError, OSError)):
            first = reason[0].split(". ")[0][:120] if reason else type(error).__name__
            raise CheckpointError(f"{path}: cannot be read: the file is damaged or truncated ({first})") from error
        detail = next((line.strip() for line in reason if any(word in line for word in UNPICKLER_REASONS)),
                      reason[0] if reason else "")
        raise CheckpointError(f"{path}: refused to load: not a plain tensor file ({detail[:200]})") from error


def guard_deepspeed_loads(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files (model and optimizer states) through `safe_load`."""
    allowed = checkpoint_safe_globals()
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location or "cpu", allowed)


def write_latest(save_dir: str | Path, iteration: int) -> None:
    """Point `latest` at `iteration` with an atomic rename."""
    write_text_atomically(Path(save_dir) / "latest", str(iteration))


def write_sat_checkpoint(folder: Path, weights: dict[str, torch.Tensor], iteration: int = 1) -> None:
    """Network `weights` as a SAT run folder: `{folder}/{iteration}/mp_rank_00_model_states.pt` (keys under
    NETWORK_PREFIX) and `latest` naming it, what the official tools and `args.load` read."""
    (folder / str(iteration)).mkdir(parents=True)
    torch.save({"module": {NETWORK_PREFIX + key: value for key, value in weights.items()}},
               folder / str(iteration) / MODEL_STATES)
    write_latest(folder, iteration)


def write_zero3_model_states(iteration_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """The SAT-layout model file of a ZeRO-3 save: the gathered `weights` as `module`, beside rank 0's
    partition metadata (shapes, buffer and shared-parameter names, version) that DeepSpeed's zero_to_fp32
    expects of every `*_model_states.pt` in the folder."""
    rank0 = safe_load(iteration_dir / ZERO3_RANK0_MODEL_STATES, allowed=checkpoint_safe_globals())
    torch.save({**rank0, "module": weights}, iteration_dir / MODEL_STATES)


def read_latest(save_dir: str | Path) -> int | None:
    """The iteration `latest` names; None when there is no `latest` (a run folder without a checkpoint yet)."""
    latest = Path(save_dir) / "latest"
    if not latest.exists() and not latest.is_symlink():
        return None
    if not latest.is_file():  # a folder or a dangling link is a damaged run folder, not an empty one
        raise CheckpointError(f"{latest} should be a file holding an iteration number, but is not a file")
    text = latest.read_text(errors="replace").strip()
    if not re.fullmatch(r"[0-9]+", text):  # str.isdigit would take superscripts
        raise CheckpointError(f"{latest} should hold an iteration number, found {text[:40]!r}")
    return int(text)


def resolve_model_states(path: str | Path) -> Path:
    """A run folder (with `latest`), an iteration folder or a file -> the model-states file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointNotFound(f"checkpoint path {path} does not exist")
    iteration = read_latest(path)
    if iteration is not None:
        candidate = path / str(iteration) / MODEL_STATES
        if not candidate.is_file():
            raise CheckpointNotFound(f"{path / 'latest'} names iteration {iteration}, but {candidate} does not exist")
        return candidate
    candidate = path / MODEL_STATES
    if not candidate.is_file():
        raise CheckpointNotFound(f"no {MODEL_STATES} in {path} (and no 'latest' file naming an iteration folder)")
    return candidate


def read_model_states(checkpoint_path: str | Path) -> tuple[Path, dict]:
    """(the model-states file, its contents) of a run folder, iteration folder or file."""
    file = resolve_model_states(checkpoint_path)
    return file, a_dict(safe_load(file, allowed=checkpoint_safe_globals()), file)


def a_dict(loaded: Any, file: Path | str) -> dict:
    """`loaded`, read from `file`; a CheckpointError unless it is a dict."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file}: not a checkpoint (holds a {type(loaded).__name__}, not a dict of weights)")
    return loaded


def state_dict_in(loaded: Any, key: str, file: Path | str) -> dict:
    """`loaded[key]`, or `loaded` itself when it has no `key` (a bare state dict); a CheckpointError unless a dict.
    Its entries are checked (`tensors_only`) once the caller has dropped those it does not use."""
    return a_dict(loaded.get(key, loaded) if isinstance(loaded, dict) else loaded, file)


def tensors_only(weights: dict, file: Path | str) -> dict[str, torch.Tensor]:
    """`weights`, checked to map names to tensors."""
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: not a checkpoint: entry {str(name)[:80]!r} of its weights is a "
                                  f"{type(value).__name__}, not a tensor")
    return weights


def network_weights(state: dict, file: Path | str) -> dict[str, torch.Tensor]:
    """The network's entries of a model-states dict, prefix removed, frozen T5/VAE entries and recomputed tables
    dropped."""
    module = state_dict_in(state, "module", file)
    weights, ignored = {}, 0
    for key, value in module.items():
        if key.startswith(IGNORED_PREFIXES):
            ignored += 1
            continue
        name = key[len(NETWORK_PREFIX):] if key.startswith(NETWORK_PREFIX) else key
        if name in IGNORED_NETWORK_KEYS:
            ignored += 1
            continue
        weights[name] = value
    if ignored:
        logger.info("%s: ignored %d entries (frozen T5/VAE weights, recomputed position tables)", file, ignored)
    return tensors_only(weights, file)


def network_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """Network weights of a checkpoint (see network_weights)."""
    file, state = read_model_states(checkpoint_path)
    return network_weights(state, file)


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf."""
    return [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def is_lora_matrix(name: str) -> bool:
    return "matrix_A" in name or "matrix_B" in name


def lora_metadata(checkpoint_path: str | Path) -> dict | None:
    """Rank, alpha, target modules and base checkpoint of an adapter-only LoRA checkpoint; None for full ones."""
    file = resolve_model_states(checkpoint_path)
    # mapped, not read, where the format allows it: torch's older (non-zip) format cannot be mapped
    state = safe_load(file, allowed=checkpoint_safe_globals(), mmap=zipfile.is_zipfile(file))
    return state.get(LORA_METADATA) if isinstance(state, dict) else None


def adapters_base(metadata: dict, file: Path | str, lora_base: str | None = None) -> str:
    """The checkpoint adapter-only weights load over: `lora_base` (args.lora_base), else the base they record."""
    base = lora_base or metadata.get("base")
    if not base:
        raise CheckpointError(f"{file} holds LoRA adapters only and records no base: set args.lora_base")
    if not Path(base).exists():
        named = f"args.lora_base={base}" if lora_base else f"the base its adapters record, {base},"
        raise CheckpointNotFound(f"{file} holds LoRA adapters only, and {named} does not exist"
                                 + ("" if lora_base else ": set args.lora_base to where that checkpoint is now"))
    return base


def ema_model_states(model_states_file: Path) -> Path:
    """{save}/{iteration}/mp_rank_00_model_states.pt -> {save}/{iteration}-ema/mp_rank_00_model_states.pt."""
    folder = model_states_file.parent
    return folder.parent / f"{folder.name}-ema" / MODEL_STATES


def load_network(network: nn.Module, checkpoint_path: str | Path, strict: bool = True, lora_base: str | None = None,
                 lora_scale: float = 1.0, use_ema: bool = False) -> None:
    """Load network weights; missing or unexpected keys are an error listing them unless `strict` is False.

    An adapter-only LoRA checkpoint is loaded over its base (`lora_base`, else the base it records); LoRA
    matrices absent from a base checkpoint are expected. `lora_scale` multiplies every adapter's output;
    `use_ema` loads the checkpoint's EMA weights over it.
    """
    file, state = read_model_states(checkpoint_path)
    weights = network_weights(state, file)
    lora = state.get(LORA_METADATA)
    if lora is not None:
        base = adapters_base(lora, file, lora_base)
        load_weights(network, network_state_dict(base), base, strict)
        load_weights(network, weights, file, strict, subset=True)
    else:
        if lora_base:
            logger.warning("args.lora_base=%s is not used: %s holds full weights, not adapters only", lora_base, file)
        load_weights(network, weights, file, strict)
    if use_ema:
        ema_file = ema_model_states(file)
        if not ema_file.is_file():
            raise CheckpointError(f"args.use_ema: {file.parent} has no EMA weights ({ema_file} is missing; "
                                  "train with args.ema_decay)")
        load_weights(network, network_weights(safe_load(ema_file), ema_file), ema_file, strict, subset=True)
    if lora_scale != 1.0:
        scale_lora(network, lora_scale)


def resized_weights(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """The keys of `weights` whose shapes differ from those in `own`, each with both shapes."""
    return {key: f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}" for key, value in weights.items()
            if key in own and value.shape != own[key].shape}


def mismatch_problems(resized: list[str], missing: list[str], unexpected: list[str]) -> list[str]:
    """Why a state dict does not fit a model, in words; empty when it fits."""
    problems = []
    if resized:
        problems.append(f"shapes differ, checkpoint vs model ({len(resized)}): {', '.join(resized[:10])}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    return problems


def weight_problems(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> list[str]:
    """Why `weights` would not load into a state dict shaped like `own`, by name and shape alone (no load hooks, as
    for a model built on meta); empty when they fit."""
    return mismatch_problems(list(resized_weights(own, weights).values()), [key for key in own if key not in weights],
                             [key for key in weights if key not in own])


def without_recomputed_table(network: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` less a stored sin-cos position table the network recomputes (official 2B checkpoints hold one)."""
    if "mixins.pos_embed.pos_embedding" in weights and not hasattr(network.mixins.pos_embed, "pos_embedding"):
        return {key: value for key, value in weights.items() if key != "mixins.pos_embed.pos_embedding"}
    return weights


def lora_layers(network: nn.Module) -> list[str]:
    """Names of the projections SAT's LoRA wraps (a LoraLinear: the base layer as `original`, adapters beside it)."""
    return [name for name, module in network.named_modules() if hasattr(module, "original")
            and hasattr(module, "matrix_A")]


def in_lora_layout(network: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with the base weight and bias of each LoRA-wrapped projection named as the network holds them
    (`P.weight` -> `P.original.weight`), which is how SAT's LoRA layers take a plain checkpoint's projections."""
    renamed = {f"{layer}.{name}": f"{layer}.original.{name}" for layer in lora_layers(network)
               for name in ("weight", "bias")}
    return {renamed.get(key, key): value for key, value in weights.items()}


def lora_rank_hint(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str:
    """What to change when the checkpoint's LoRA matrices do not fit: the config's rank, or a LoRA overlay."""
    ranks = {value.shape[0] for key, value in weights.items() if ".matrix_A." in key and value.ndim == 2}
    if not ranks:
        return ""
    rank = ", ".join(map(str, sorted(ranks)))
    if not any(is_lora_matrix(key) for key in own):
        return f" (it holds LoRA layers of rank {rank}: add configs/lora.yaml with that rank)"
    own_ranks = {value.shape[0] for key, value in own.items() if ".matrix_A." in key}
    if own_ranks != ranks:
        return (f" (its LoRA layers have rank {rank}: set model.network_config.params.modules.lora_config.params.r="
                f"{rank})")
    return ""


def load_weights(network: nn.Module, weights: dict[str, torch.Tensor], source: str | Path, strict: bool,
                 subset: bool = False) -> None:
    """load_state_dict with the problems listed; `subset` expects only some keys (adapters, EMA weights). The names
    are compared here, not taken from load_state_dict, whose report SAT's LoRA layers leave empty."""
    broken = non_finite(weights)
    if broken:  # whatever strict says: a damaged file, sampled it gives black videos
        raise CheckpointError(f"checkpoint {source}: {len(broken)} weight tensors hold NaN or inf (the first: "
                              f"{broken[0]}); the file is damaged")
    weights = in_lora_layout(network, without_recomputed_table(network, weights))
    own = network.state_dict()
    resized = resized_weights(own, weights)
    missing = [] if subset else [key for key in own if key not in weights and not is_lora_matrix(key)]
    unexpected = [key for key in weights if key not in own]
    network.load_state_dict({key: value for key, value in weights.items() if key in own and key not in resized},
                            strict=False)
    problems = mismatch_problems(list(resized.values()), missing, unexpected)
    if problems:
        message = (f"checkpoint {source} does not match the model config{lora_rank_hint(own, weights)}: "
                   + "; ".join(problems))
        if strict:
            raise CheckpointError(message + " (set args.strict_load=false to load the rest anyway)")
        logger.warning(message + ("; those weights keep their initial values" if resized or missing else ""))


def scale_lora(network: nn.Module, scale: float) -> None:
    """Multiply the output of every LoRA adapter (SAT's LoraLinear: lora_alpha / r) by `scale`."""
    adapters = [module for module in network.modules() if hasattr(module, "matrix_A") and hasattr(module, "scaling")]
    if not adapters:
        raise CheckpointError("args.lora_scale: the model has no LoRA layers (add configs/lora.yaml)")
    for module in adapters:
        module.scaling = module.lora_alpha / module.r * scale
