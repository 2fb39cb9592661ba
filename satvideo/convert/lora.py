"""SAT `LoraMixin` adapters -> PEFT LoRA weights for diffusers' `CogVideoXPipeline.load_lora_weights`.

SAT adds `(x @ A.T @ B.T) * lora_alpha / r` per projection; PEFT adds `x @ A.T @ B.T * alpha / r` with alpha = r
when a file carries no alphas. Folding SAT's scale into B makes the exported file exact at diffusers' scale 1.0.
"""

from __future__ import annotations

import math
import re

import torch

from satvideo.config import is_number

SAT_LORA = re.compile(r"transformer\.layers\.(\d+)\.attention\.(query_key_value|dense)\.matrix_([AB])\.(\d+)$")
# (SAT projection, partition index) -> diffusers attention submodule
PEFT_TARGETS = {("query_key_value", "0"): "to_q", ("query_key_value", "1"): "to_k",
                ("query_key_value", "2"): "to_v", ("dense", "0"): "to_out.0"}
# diffusers' CogVideoX LoRA loader reads transformer keys under this prefix.
PEFT_PREFIX = "transformer."


def is_lora_alpha(value: object) -> bool:
    """A usable `lora_alpha`: a finite number > 0."""
    return is_number(value) and math.isfinite(value) and value > 0


def sat_lora_to_peft(state_dict: dict[str, torch.Tensor], lora_alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """LoRA matrices of a satvideo/SAT state dict (other keys ignored) -> PEFT state dict, scale folded into B.

    `lora_alpha` is the `lora_config.params.lora_alpha` the adapter was trained with (SAT's default is 1).
    """
    converted = {}
    for key, value in state_dict.items():
        match = SAT_LORA.match(key)
        if match is None:
            continue
        layer, projection, matrix, index = match.groups()
        if (projection, index) not in PEFT_TARGETS:
            raise ValueError(f"{key}: unexpected LoRA partition (q, k, v for query_key_value; one for dense)")
        if value.ndim != 2:
            raise ValueError(f"{key}: a LoRA matrix is 2-D ({'[r, in]' if matrix == 'A' else '[out, r]'}), found shape "
                             f"{list(value.shape)}")
        if matrix == "B":
            rank = value.shape[1]
            value = value * (lora_alpha / rank)
        name = f"{PEFT_PREFIX}transformer_blocks.{layer}.attn1.{PEFT_TARGETS[projection, index]}.lora_{matrix}.weight"
        converted[name] = value.contiguous()
    if not converted:
        raise ValueError("no LoRA matrices (transformer.layers.*.attention.*.matrix_A/B.*) in the state dict")
    return converted
