"""Helpers of the conversion tests: random tiny models, diffusers forward on satvideo inputs, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, one_line_error, tiny_network_config
from torch import nn

from satvideo.dit.positions import rotary_frequencies
from satvideo.checkpoint import MODEL_STATES, NETWORK_PREFIX, write_latest


def parity_network_config(family: str, num_layers: int = 2, lora_rank: int | None = None) -> dict:
    """tiny_network_config, with the ofs embedding as wide as the time embedding (diffusers' ofs MLP maps
    ofs_embed_dim -> ofs_embed_dim and adds it to the time embedding, so only equal widths exist there)."""
    config = tiny_network_config(family, num_layers=num_layers, lora_rank=lora_rank)
    params = config["params"]
    if params.get("ofs_embed_dim"):
        params["ofs_embed_dim"] = params["time_embed_dim"]
    return config


def randomize(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Every parameter random (LayerNorm weights around 1, the rest around 0): zero-initialised adaLN and LoRA B
    would otherwise hide mapping mistakes."""
    generator = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(noise + 1 if id(parameter) in norm_weights else noise)
    return module.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def diffusers_output(model: nn.Module, inputs: dict, ofs: float = 2.0) -> torch.Tensor:
    """diffusers transformer on satvideo-style inputs: image latents concatenated on channels, satvideo's own
    rotary angles (what the diffusers pipeline would compute at the default size), ofs as the 1.5-I2V pipeline."""
    config = model.config
    x = inputs["x"]
    if "concat_images" in inputs:
        x = torch.cat([x, inputs["concat_images"]], dim=2)
    batch, frames, _, height, width = x.shape
    extra = {}
    if config.use_rotary_positional_embeddings:
        grid = (frames // (config.patch_size_t or 1), height // config.patch_size, width // config.patch_size)
        angles = rotary_frequencies(config.attention_head_dim, grid)
        extra["image_rotary_emb"] = (angles.cos(), angles.sin())
    if config.ofs_embed_dim:
        extra["ofs"] = torch.full((batch,), ofs)
    return model(hidden_states=x, encoder_hidden_states=inputs["context"], timestep=inputs["timesteps"],
                 **extra).sample


def write_sat_checkpoint(save_dir: Path, weights: dict) -> None:
    """The official layout: {save}/1/mp_rank_00_model_states.pt with prefixed keys, plus `latest`."""
    (save_dir / "1").mkdir(parents=True)
    module = {NETWORK_PREFIX + key: value for key, value in weights.items()}
    torch.save({"module": module}, save_dir / "1" / MODEL_STATES)
    write_latest(save_dir, 1)


def run_cli(*args: str, expect_error: bool = False) -> str:
    """scripts/convert_weights.py in a subprocess, as a user runs it; with `expect_error`, the one-line message it
    ends with (exit code 2, no traceback)."""
    command = [sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if not expect_error:
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout
    last = one_line_error(result)
    assert last.startswith("error: "), result.stderr[-3000:]
    return last
