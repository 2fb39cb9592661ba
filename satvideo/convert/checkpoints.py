"""Checkpoint folders on disk: SAT layout <-> diffusers model folders (the work of scripts/convert_weights.py).

    SAT         {dir}/transformer/{iteration}/mp_rank_00_model_states.pt + latest, {dir}/vae/3d-vae.pt
    diffusers   {dir}/config.json + diffusion_pytorch_model.safetensors (or sharded with an index),
                LoRA: {dir}/pytorch_lora_weights.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from satvideo.config import load_config, to_plain
from satvideo.convert.lora import sat_lora_to_peft
from satvideo.convert.transformer import (diffusers_to_sat_transformer, diffusers_transformer_config,
                                          network_config_from_diffusers, sat_to_diffusers_transformer)
from satvideo.convert.vae import diffusers_vae_config, diffusers_vae_to_sat, sat_vae_to_diffusers
from satvideo.checkpoint import (LORA_METADATA, MODEL_STATES, NETWORK_PREFIX, network_state_dict, network_weights,
                                 read_model_states, write_latest)
from satvideo.vae.autoencoder import load_vae_state_dict

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SAT_ITERATION = 1


def write_diffusers_folder(out_dir: str | Path, class_name: str, config: dict,
                           state_dict: dict[str, torch.Tensor]) -> None:
    """`config.json` and one safetensors file, the folder `{class_name}.from_pretrained` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=2))
    save_file({key: value.contiguous() for key, value in state_dict.items()}, out_dir / WEIGHTS_NAME)


def read_diffusers_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers model folder, single-file or sharded."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if (folder / WEIGHTS_NAME).is_file():
        return config, load_file(folder / WEIGHTS_NAME)
    if not (folder / WEIGHTS_INDEX_NAME).is_file():
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    shards = sorted(set(json.loads((folder / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
    state_dict = {}
    for shard in shards:
        state_dict.update(load_file(folder / shard))
    return config, state_dict


def sat_to_diffusers_checkpoint(config_paths: list[str], checkpoint: str | Path, out_dir: str | Path,
                                vae: str | Path | None = None, vae_out: str | Path | None = None) -> None:
    """SAT transformer checkpoint (and optionally `3d-vae.pt`) -> diffusers folders, for the model of `config_paths`."""
    if (vae is None) != (vae_out is None):
        raise ValueError("converting the VAE needs both the SAT file (--vae) and an output folder (--vae-out)")
    model = to_plain(load_config(config_paths).model)
    params = model["network_config"]["params"]
    weights = network_state_dict(checkpoint)
    if not (params["modules"]["pos_embed_config"].get("params") or {}).get("learnable_pos_embed", False):
        weights.pop("mixins.pos_embed.pos_embedding", None)  # the fixed sin-cos table (2B), recomputed by both
    write_diffusers_folder(out_dir, "CogVideoXTransformer3DModel", diffusers_transformer_config(params),
                           sat_to_diffusers_transformer(weights, params["num_layers"]))
    if vae is not None:
        first_stage = model["first_stage_config"]["params"]
        config = diffusers_vae_config(first_stage["encoder_config"]["params"], first_stage["decoder_config"]["params"],
                                      scaling_factor=model.get("scale_factor"))
        state_dict = sat_vae_to_diffusers(load_vae_state_dict(str(vae)))
        write_diffusers_folder(vae_out, "AutoencoderKLCogVideoX", config,
                               {key: value.float() for key, value in state_dict.items()})


def diffusers_to_sat_checkpoint(transformer_dir: str | Path, out_dir: str | Path,
                                vae_dir: str | Path | None = None) -> None:
    """diffusers transformer (and optionally VAE) folders -> SAT folder with `transformer/`, `vae/`, `model.yaml`."""
    out_dir = Path(out_dir)
    config, state_dict = read_diffusers_folder(transformer_dir)
    weights = diffusers_to_sat_transformer(state_dict)
    network = network_config_from_diffusers(config)
    iteration_dir = out_dir / "transformer" / str(SAT_ITERATION)
    iteration_dir.mkdir(parents=True, exist_ok=True)
    module = {NETWORK_PREFIX + key: value for key, value in weights.items()}
    torch.save({"module": module}, iteration_dir / MODEL_STATES)
    write_latest(out_dir / "transformer", SAT_ITERATION)
    model = {"network_config": network}
    if vae_dir is not None:
        vae_config, vae_state = read_diffusers_folder(vae_dir)
        (out_dir / "vae").mkdir(exist_ok=True)
        torch.save({"state_dict": {key: value.float() for key, value in diffusers_vae_to_sat(vae_state).items()}},
                   out_dir / "vae" / "3d-vae.pt")
        if "scaling_factor" in vae_config:
            model["scale_factor"] = vae_config["scaling_factor"]
    OmegaConf.save(OmegaConf.create({"model": model}), out_dir / "model.yaml")


def sat_lora_to_diffusers_checkpoint(checkpoint: str | Path, out_dir: str | Path, lora_alpha: float | None = None) -> None:
    """LoRA matrices of a SAT checkpoint -> `pytorch_lora_weights.safetensors` for `load_lora_weights`.

    `lora_alpha` defaults to the one a satvideo adapter checkpoint records (SAT's default 1 for older ones).
    """
    file, state = read_model_states(checkpoint)
    if lora_alpha is None:
        lora_alpha = state.get(LORA_METADATA, {}).get("lora_alpha", 1.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(sat_lora_to_peft(network_weights(state, file), lora_alpha), out_dir / LORA_WEIGHTS_NAME)
