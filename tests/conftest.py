"""Shared fixtures: tiny versions of every model family, built from the full-size configs."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from satvideo.checkpoint import MODEL_STATES, NETWORK_PREFIX, write_latest
from satvideo.config import SatvideoError, load_config, to_plain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {
    "2b": "configs/cogvideox_2b.yaml",
    "5b": "configs/cogvideox_5b.yaml",
    "5b_i2v": "configs/cogvideox_5b_i2v.yaml",
    "1.5_5b": "configs/cogvideox1.5_5b.yaml",
    "1.5_5b_i2v": "configs/cogvideox1.5_5b_i2v.yaml",
}
TINY_TEXT_DIM = 32
TINY_TEXT_LENGTH = 8


def family_config(family: str, **network_overrides) -> dict:
    """The full `model` section of a family's config as a plain dict."""
    config = load_config([os.path.join(ROOT, FAMILIES[family])])
    model = to_plain(config.model)
    model["network_config"]["params"].update(network_overrides)
    return model


def tiny_network_config(family: str, num_layers: int = 2, lora_rank: int | None = None) -> dict:
    """`{target, params}` of a 2-layer, 64-wide, 4-head version of a family (head dim 16), 8x8 latents."""
    network = family_config(family)["network_config"]
    params = network["params"]
    params.update(num_layers=num_layers, hidden_size=64, num_attention_heads=4, time_embed_dim=32,
                  latent_width=8, latent_height=8, num_frames=9)
    params["transformer_args"]["checkpoint_activations"] = False
    if params.get("ofs_embed_dim"):
        params["ofs_embed_dim"] = 16
    modules = params["modules"]
    modules["patch_embed_config"]["params"]["text_hidden_size"] = TINY_TEXT_DIM
    pos = modules["pos_embed_config"]["params"]
    pos["text_length"] = TINY_TEXT_LENGTH
    if "hidden_size_head" in pos:
        pos["hidden_size_head"] = 16
    if lora_rank:
        modules["lora_config"] = {"target": "sat.model.finetune.lora2.LoraMixin", "params": {"r": lora_rank}}
    return network


def tiny_inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    """Random latents, timesteps and text features matching `tiny_network_config(family)`."""
    generator = torch.Generator().manual_seed(seed)
    params = family_config(family)["network_config"]["params"]
    channels = 16
    frames = 4 if isinstance(params["patch_size"], list) else 3
    inputs = {
        "x": torch.randn(batch, frames, channels, 8, 8, generator=generator),
        "timesteps": torch.randint(0, 1000, (batch,), generator=generator),
        "context": torch.randn(batch, TINY_TEXT_LENGTH, TINY_TEXT_DIM, generator=generator),
    }
    if params["in_channels"] > channels:
        inputs["concat_images"] = torch.randn(batch, frames, params["in_channels"] - channels, 8, 8,
                                              generator=generator)
    return inputs


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def script_error(script: str, *argv: str) -> str:
    """The message of the satvideo error that `scripts/{script}`'s main raises for these arguments, in this process
    (run_entrypoint prints it as `error: {message}`; one test per script runs the real command line)."""
    main = runpy.run_path(os.path.join(ROOT, "scripts", script))["main"]
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        with pytest.raises(SatvideoError) as error:
            main()
    finally:
        sys.argv = saved
    return str(error.value)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The last line a command that failed as satvideo's entry points fail (exit code 2, no traceback) wrote."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def save_sat(weights: dict, folder: Path, **extra) -> Path:
    """`weights` (network names) as a SAT run folder: `latest` naming iteration 1, with `extra` beside `module`."""
    (folder / "1").mkdir(parents=True)
    torch.save({"module": {NETWORK_PREFIX + key: value for key, value in weights.items()}, **extra},
               folder / "1" / MODEL_STATES)
    write_latest(folder, 1)
    return folder
