"""Checkpoints in the SwissArmyTransformer layout, readable by the official tools.

    {save}/{iteration}/mp_rank_00_model_states.pt   {"module": state dict with model.diffusion_model.* keys, ...}
    {save}/{iteration}/zero_pp_rank_*_optim_states.pt  optimizer shards (DeepSpeed ZeRO), for exact resume
    {save}/latest                                   the newest complete iteration, as text

`latest` is replaced atomically and only after every rank has finished writing, so an interrupted save never
becomes the checkpoint a resumed run starts from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_RANK0_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
NETWORK_PREFIX = "model.diffusion_model."
# Keys of official checkpoints that satvideo recomputes or keeps elsewhere: frozen T5 and VAE weights,
# SAT's unused token/position embeddings, RoPE and sin-cos tables.
IGNORED_PREFIXES = ("conditioner.", "first_stage_model.")
IGNORED_NETWORK_KEYS = ("transformer.word_embeddings.weight", "transformer.position_embeddings.weight",
                        "mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos")

logger = logging.getLogger(__name__)


def write_latest(save_dir: str | Path, iteration: int) -> None:
    """Point `latest` at `iteration` with an atomic rename."""
    save_dir = Path(save_dir)
    temporary = save_dir / "latest.tmp"
    temporary.write_text(str(iteration))
    os.replace(temporary, save_dir / "latest")


def write_zero3_model_states(iteration_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """The SAT-layout model file of a ZeRO-3 save: the gathered `weights` as `module`, beside rank 0's
    partition metadata (shapes, buffer and shared-parameter names, version) that DeepSpeed's zero_to_fp32
    expects of every `*_model_states.pt` in the folder."""
    rank0 = torch.load(iteration_dir / ZERO3_RANK0_MODEL_STATES, map_location="cpu", weights_only=True)
    torch.save({**rank0, "module": weights}, iteration_dir / MODEL_STATES)


def read_latest(save_dir: str | Path) -> int | None:
    latest = Path(save_dir) / "latest"
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{latest} should hold an iteration number, found {text!r}")
    return int(text)


def resolve_model_states(path: str | Path) -> Path:
    """A run folder (with `latest`), an iteration folder or a file -> the model-states file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    iteration = read_latest(path)
    if iteration is not None:
        path = path / str(iteration)
    candidate = path / MODEL_STATES
    if not candidate.is_file():
        raise FileNotFoundError(f"no {MODEL_STATES} in {path} (and no 'latest' file naming an iteration folder)")
    return candidate


def network_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """Network weights of a checkpoint, prefix removed, frozen T5/VAE entries and recomputed tables dropped."""
    file = resolve_model_states(checkpoint_path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    module = state.get("module", state)
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
    return weights


def load_network(network: nn.Module, checkpoint_path: str | Path, strict: bool = True) -> None:
    """Load network weights; missing or unexpected keys are an error listing them unless `strict` is False.

    LoRA matrices absent from a base checkpoint are expected and not reported.
    """
    weights = network_state_dict(checkpoint_path)
    if "mixins.pos_embed.pos_embedding" in weights and not hasattr(network.mixins.pos_embed, "pos_embedding"):
        weights.pop("mixins.pos_embed.pos_embedding")  # a fixed sin-cos table, recomputed here
    result = network.load_state_dict(weights, strict=False)
    missing = [key for key in result.missing_keys if "matrix_A" not in key and "matrix_B" not in key]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys ({len(result.unexpected_keys)}): {', '.join(result.unexpected_keys[:20])}")
    if problems:
        message = f"checkpoint {checkpoint_path} does not match the model config: " + "; ".join(problems)
        if strict:
            raise ValueError(message + " (set args.strict_load=false to load anyway)")
        logger.warning(message)
