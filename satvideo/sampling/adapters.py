"""LoRA adapters at sampling time: satvideo/SAT adapter checkpoints and diffusers (PEFT) files, loaded over a
base checkpoint with a scale each and merged into its weights.

A SAT adapter adds, per projection and partition p, x @ A_p^T @ B_p^T * lora_alpha / r (partitions q, k, v of
`query_key_value`, one for `dense`); merged, the weight grows by cat_p(B_p @ A_p) * lora_alpha / r * scale. A PEFT
file written by `lora-to-diffusers` (or any file without alphas) has the scale folded into B: B @ A * scale.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from satvideo.checkpoint import lora_metadata, network_weights, read_model_states
from satvideo.config import FINITE_NUMBER, ConfigError, check_value, to_plain
from satvideo.convert.checkpoints import read_safetensors
from satvideo.convert.lora import PEFT_TARGETS, SAT_LORA

LORA_MIXIN = "sat.model.finetune.lora2.LoraMixin"
PEFT_FILE = "pytorch_lora_weights.safetensors"
PEFT_LORA = re.compile(r"(?:transformer\.)?transformer_blocks\.(\d+)\.attn1\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight$")
PEFT_ROWS = {target: (projection, int(partition)) for (projection, partition), target in PEFT_TARGETS.items()}
PARTITIONS = Counter(projection for projection, _ in PEFT_TARGETS)  # query_key_value: 3 (q, k, v); dense: 1


def add_lora_from_checkpoint(config: DictConfig, checkpoint: str) -> None:
    """An adapter-only checkpoint needs LoRA layers: add `lora_config` from its metadata when the model config has
    none, and take the recorded alpha when it has one (a config rank that differs is an error)."""
    metadata = lora_metadata(checkpoint)
    if metadata is None:
        return
    modules = config.model.network_config.params.modules
    if "lora_config" not in modules:
        modules.lora_config = {"target": LORA_MIXIN, "params": {"r": metadata["r"], "lora_alpha": metadata["lora_alpha"]}}
        return
    params = modules.lora_config.setdefault("params", {})
    if params.get("r") != metadata["r"]:
        raise ConfigError(f"model.network_config.params.modules.lora_config.params.r={params.get('r')}"
                          f" differs from the rank {metadata['r']} of the adapters in {checkpoint}")
    params.lora_alpha = metadata["lora_alpha"]  # the adapters were trained with it: another alpha rescales them


def adapter_list(value) -> list[tuple[str, float]]:
    """`args.lora`: paths, or {path, scale} mappings -> [(path, scale)]; each path must exist."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, ListConfig)) else [value]
    adapters = []
    for index, item in enumerate(items):
        key = f"args.lora[{index}]"
        if isinstance(item, str):
            path, scale = item, 1.0
        elif isinstance(item, (dict, DictConfig)):
            unknown = sorted(set(map(str, item)) - {"path", "scale"})
            if unknown:
                raise ConfigError(f"{key}: unknown key {unknown[0]!r}; an adapter is {{path, scale}}")
            path, scale = item.get("path"), item.get("scale", 1.0)
            check_value(f"{key}.scale", scale, FINITE_NUMBER)
        else:
            raise ConfigError(f"{key}={to_plain(item)!r}: expected a path or {{path: ..., scale: ...}}")
        if not isinstance(path, str) or not path or not Path(path).exists():
            raise ConfigError(f"args.lora: adapter {path} does not exist")
        adapters.append((path, float(scale)))
    return adapters


def peft_file(path: str) -> Path | None:
    path = Path(path)
    if path.is_dir() and (path / PEFT_FILE).is_file():
        return path / PEFT_FILE
    return path if path.suffix == ".safetensors" else None


def adapter_deltas(path: str) -> dict[str, torch.Tensor]:
    """Network weight name -> the change one adapter makes to it at scale 1. A projection whose adapter covers only
    some of its partitions (a PEFT file adapting to_q alone) changes only those rows."""
    pieces: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    peft = peft_file(path)
    if peft is not None:
        metadata = {"lora_alpha": 1.0, "r": 1}  # the scale is folded into B
        for key, value in read_safetensors(peft).items():
            match = PEFT_LORA.match(key)
            if match:
                layer, target, matrix = match.groups()
                projection, partition = PEFT_ROWS[target]
                pieces[int(layer), projection][partition][matrix] = value
    else:
        file, state = read_model_states(path)
        metadata = state.get("lora") or {}
        for key, value in network_weights(state, file).items():
            match = SAT_LORA.match(key)
            if match:
                layer, projection, matrix, partition = match.groups()
                pieces[int(layer), projection][int(partition)][matrix] = value
    if not pieces:
        raise ConfigError(f"args.lora: {path} holds no LoRA matrices")
    for (layer, projection), partitions in pieces.items():
        for partition, matrices in partitions.items():
            where = f"args.lora: {path}: layer {layer} {projection} partition {partition}"
            if partition >= PARTITIONS[projection]:
                raise ConfigError(f"{where}: {projection} has {PARTITIONS[projection]} partition(s)")
            if (set(matrices) != {"A", "B"} or any(matrix.ndim != 2 for matrix in matrices.values())
                    or matrices["B"].shape[1] != matrices["A"].shape[0]):
                shapes = ", ".join(f"{name} {list(matrix.shape)}" for name, matrix in sorted(matrices.items()))
                raise ConfigError(f"{where} needs a pair A [r, in] and B [out, r]; found {shapes}")
    rank = next(iter(next(iter(pieces.values())).values()))["A"].shape[0]
    scale = metadata.get("lora_alpha", 1.0) / metadata.get("r", rank)  # SAT's default alpha is 1
    deltas = {}
    for (layer, projection), partitions in pieces.items():
        # [out_p, in] per partition, stacked in partition order; an absent partition changes nothing
        shape = next(iter(partitions.values()))
        rows = [partitions[p]["B"].float() @ partitions[p]["A"].float() if p in partitions
                else torch.zeros(shape["B"].shape[0], shape["A"].shape[1]) for p in range(PARTITIONS[projection])]
        deltas[f"transformer.layers.{layer}.attention.{projection}.weight"] = torch.cat(rows) * scale
    return deltas


@torch.no_grad()
def merge_adapters(network: torch.nn.Module, adapters: list[tuple[str, float]]) -> None:
    """Add each adapter's change, times its scale, to the network's weights (a network without LoRA layers)."""
    if adapters and "lora" in network.mixins:
        raise ConfigError("args.lora merges adapters into plain weights: leave configs/lora.yaml out of the config")
    parameters = dict(network.named_parameters())
    for path, scale in adapters:
        for name, delta in adapter_deltas(path).items():
            if name not in parameters or parameters[name].shape != delta.shape:
                raise ConfigError(f"args.lora: {path} does not fit this model ({name})")
            parameters[name].add_(delta.to(parameters[name]) * scale)
