"""Checkpoint folders on disk: SAT layout <-> diffusers model folders (the work of scripts/convert_weights.py).

    SAT         {dir}/transformer/{iteration}/mp_rank_00_model_states.pt + latest, {dir}/vae/3d-vae.pt
    diffusers   {dir}/config.json + diffusion_pytorch_model.safetensors (or sharded with an index),
                LoRA: {dir}/pytorch_lora_weights.safetensors
"""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from satvideo.atomic_files import folder_replaced_atomically, replaced_atomically
from satvideo.checkpoint import (LORA_METADATA, network_state_dict, network_weights, read_model_states,
                                 weight_problems, without_recomputed_table, write_sat_checkpoint)
from satvideo.config import (CheckpointError, CheckpointNotFound, ConfigError, SatvideoError, instantiate_from_config,
                             load_config, to_plain)
from satvideo.convert.lora import is_lora_alpha, sat_lora_to_peft
from satvideo.convert.transformer import (diffusers_to_sat_transformer, diffusers_transformer_config,
                                          network_config_from_diffusers, sat_to_diffusers_transformer)
from satvideo.convert.vae import SAT_ONLY_PREFIXES, diffusers_vae_config, diffusers_vae_to_sat, sat_vae_to_diffusers
from satvideo.vae.autoencoder import load_vae_state_dict

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_CLASS = "CogVideoXTransformer3DModel"
VAE_CLASS = "AutoencoderKLCogVideoX"


def write_diffusers_folders(folders: list[tuple[str | Path, str, dict, dict[str, torch.Tensor]]]) -> None:
    """Each (out_dir, class name, config, state dict) as `config.json` and one safetensors file, the folder
    `{class_name}.from_pretrained` reads. Every folder is filled before any is renamed into place, so a failure
    while writing (a full disk, a folder that cannot be made) leaves none of them; an earlier folder at an out_dir
    is replaced."""
    with ExitStack() as stack:
        for out_dir, class_name, config, state_dict in folders:
            partial = stack.enter_context(folder_replaced_atomically(out_dir))
            (partial / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=2))
            save_file({key: value.contiguous() for key, value in state_dict.items()}, partial / WEIGHTS_NAME)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointNotFound(f"{path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not readable JSON ({error})") from error


def read_diffusers_folder(folder: str | Path, class_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers model folder of `class_name`, single-file or sharded."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointNotFound(f"{folder} is not a diffusers model folder (no config.json)")
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} holds no JSON object")
    if config.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{folder} holds a {config['_class_name']}, not a {class_name}")
    if (folder / WEIGHTS_NAME).is_file():
        return config, read_safetensors(folder / WEIGHTS_NAME)
    index = folder / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise CheckpointNotFound(f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    weight_map = read_json(index)
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
        raise CheckpointError(f"{index} has no weight_map")
    state_dict = {}
    for shard in sorted(set(map(str, weight_map["weight_map"].values()))):
        state_dict.update(read_safetensors(folder / shard))
    return config, state_dict


@contextmanager
def converting(source: str | Path) -> Iterator[None]:
    """The key mapping's complaints (unknown keys, missing layers, no counterpart) as one line naming `source`."""
    try:
        yield
    except SatvideoError:
        raise
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error


def on_meta(config: dict, **params) -> nn.Module:
    """The module of a `{target, params}` config with its tensors on the meta device: shapes without memory."""
    config = copy.deepcopy(config)
    config["params"] = {**(config.get("params") or {}), **params}
    with torch.device("meta"):
        return instantiate_from_config(config)


def check_weights_fit(weights: dict[str, torch.Tensor], model: nn.Module, source: str | Path, config: str) -> None:
    problems = weight_problems(model.state_dict(), weights)
    if problems:
        raise CheckpointError(f"{source} does not fit {config}: " + "; ".join(problems))


def sat_to_diffusers_checkpoint(config_paths: list[str], checkpoint: str | Path, out_dir: str | Path,
                                vae: str | Path | None = None, vae_out: str | Path | None = None) -> None:
    """SAT transformer checkpoint (and optionally `3d-vae.pt`) -> diffusers folders, for the model of `config_paths`.
    Everything is read and checked against the config before anything is written."""
    if (vae is None) != (vae_out is None):
        raise ConfigError("converting the VAE needs both the SAT file (--vae) and an output folder (--vae-out)")
    config = load_config(config_paths)
    sections = ["network_config"] + (["first_stage_config"] if vae is not None else [])
    for section in sections:
        if "model" not in config or section not in config.model:
            raise ConfigError(f"no model.{section} in {' '.join(map(str, config_paths))}")
    model = to_plain(config.model)
    network_config = model["network_config"]
    params = network_config["params"]
    network = on_meta(network_config, device="meta")
    weights = without_recomputed_table(network, network_state_dict(checkpoint))
    check_weights_fit(weights, network, checkpoint, "model.network_config")
    with converting(checkpoint):
        transformer = sat_to_diffusers_transformer(weights, params["num_layers"])
    if vae is not None:
        first_stage = model["first_stage_config"]
        sat_vae = load_vae_state_dict(str(vae), SAT_ONLY_PREFIXES)
        check_weights_fit(sat_vae, on_meta(first_stage, ckpt_path=None), vae, "model.first_stage_config")
        stage_params = first_stage["params"]
        with converting(vae):
            vae_config = diffusers_vae_config(stage_params["encoder_config"]["params"],
                                              stage_params["decoder_config"]["params"],
                                              scaling_factor=model.get("scale_factor"))
    with converting(checkpoint):
        transformer_config = diffusers_transformer_config(params)
    folders = [(out_dir, TRANSFORMER_CLASS, transformer_config, transformer)]
    if vae is not None:
        folders.append((vae_out, VAE_CLASS, vae_config,
                        {key: value.float() for key, value in sat_vae_to_diffusers(sat_vae).items()}))
    write_diffusers_folders(folders)


def diffusers_to_sat_checkpoint(transformer_dir: str | Path, out_dir: str | Path,
                                vae_dir: str | Path | None = None) -> None:
    """diffusers transformer (and optionally VAE) folders -> SAT folder with `transformer/`, `vae/`, `model.yaml`,
    checked to load into the network it describes; the folder appears whole or not at all."""
    config, state_dict = read_diffusers_folder(transformer_dir, TRANSFORMER_CLASS)
    with converting(transformer_dir):
        weights = diffusers_to_sat_transformer(state_dict)
        try:
            network = network_config_from_diffusers(config)
        except KeyError as error:
            raise CheckpointError(f"{Path(transformer_dir) / 'config.json'} has no {error}") from error
    check_weights_fit(weights, on_meta(network, device="meta"), transformer_dir, "its own config.json")
    model = {"network_config": network}
    if vae_dir is not None:
        vae_config, vae_state = read_diffusers_folder(vae_dir, VAE_CLASS)
        vae_weights = {key: value.float() for key, value in diffusers_vae_to_sat(vae_state).items()}
        if "scaling_factor" in vae_config:
            model["scale_factor"] = vae_config["scaling_factor"]
    with folder_replaced_atomically(out_dir) as partial:
        write_sat_checkpoint(partial / "transformer", weights)
        if vae_dir is not None:
            (partial / "vae").mkdir()
            torch.save({"state_dict": vae_weights}, partial / "vae" / "3d-vae.pt")
        OmegaConf.save(OmegaConf.create({"model": model}), partial / "model.yaml")


def sat_lora_to_diffusers_checkpoint(checkpoint: str | Path, out_dir: str | Path, lora_alpha: float | None = None) -> None:
    """LoRA matrices of a SAT checkpoint -> `pytorch_lora_weights.safetensors` for `load_lora_weights`.

    `lora_alpha` defaults to the one a satvideo adapter checkpoint records (SAT's default 1 for older ones). An
    existing file of that name in `out_dir` is replaced whole.
    """
    file, state = read_model_states(checkpoint)
    if lora_alpha is None:
        record = state.get(LORA_METADATA) or {}
        lora_alpha = record.get("lora_alpha", 1.0) if isinstance(record, dict) else None
        if not is_lora_alpha(lora_alpha):
            raise CheckpointError(f"{file}: its recorded LoRA alpha ({lora_alpha!r} in {record!r:.80}) is not a number "
                                  "> 0; give the run's alpha with --lora-alpha")
    with converting(file):
        peft = sat_lora_to_peft(network_weights(state, file), lora_alpha)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out_dir / LORA_WEIGHTS_NAME) as partial:
        save_file(peft, partial)
