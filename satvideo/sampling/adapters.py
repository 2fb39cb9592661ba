"""LoRA adapters at sampling time: satvideo/SAT adapter checkpoints and diffusers (PEFT) files, loaded over a
base checkpoint with a scale each and merged into its weights.

A SAT adapter adds, per projection and partition p, x @ A_p^T @ B_p^T * lora_alpha / r (partitions q, k, v of
`query_key_value`, one for `dense`); merged, the weight grows by cat_p(B_p @ A_p) * lora_alpha / r * scale. A PEFT
file is applied as diffusers applies it: with the lora_alpha / r that diffusers records in its header
(`lora_adapter_metadata`), else at 1, the scale `lora-to-diffusers` folds into B. (Files of CogVideo's own
`export_sat_lora_weight.py` hold SAT's raw matrices without a header: give them `scale: 1/r`, as its docs give
diffusers `lora_scale=1/r`.)
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig
from safetensors import safe_open

from satvideo.atomic_files import folder_replaced_atomically
from satvideo.checkpoint import (LORA_METADATA, adapters_base, is_lora_matrix, lora_metadata, network_state_dict,
                                 network_weights, read_model_states, resolve_model_states, write_sat_checkpoint)
from satvideo.config import FINITE_NUMBER, ConfigError, check_value, to_plain
from satvideo.convert.checkpoints import read_safetensors
from satvideo.convert.lora import PEFT_TARGETS, SAT_LORA

LORA_MIXIN = "sat.model.finetune.lora2.LoraMixin"
PEFT_FILE = "pytorch_lora_weights.safetensors"
PEFT_LORA = re.compile(r"(?:transformer\.)?transformer_blocks\.(\d+)\.attn1\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight$")
PEFT_ROWS = {target: (projection, int(partition)) for (projection, partition), target in PEFT_TARGETS.items()}
PARTITIONS = Counter(projection for projection, _ in PEFT_TARGETS)  # query_key_value: 3 (q, k, v); dense: 1
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' header entry: the PEFT LoraConfig, keys under "transformer."


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


def peft_scale(file: Path) -> float:
    """The factor diffusers applies to a PEFT file's B @ A: lora_alpha / r (/ sqrt(r) with rsLoRA) from the header
    diffusers writes, else 1. Per-module ranks or alphas and DoRA are refused: a merge cannot honour them."""
    with safe_open(str(file), framework="pt") as opened:
        recorded = (opened.metadata() or {}).get(PEFT_METADATA)
    if recorded is None:
        return 1.0
    where = f"args.lora: {file}: its header's {PEFT_METADATA}"
    try:
        settings = json.loads(recorded)
    except ValueError:
        raise ConfigError(f"{where} is not JSON") from None
    settings = {key[len("transformer."):]: value for key, value in settings.items() if key.startswith("transformer.")}
    if not settings:
        return 1.0
    if settings.get("rank_pattern") or settings.get("alpha_pattern") or settings.get("use_dora"):
        raise ConfigError(f"{where} gives per-module ranks or alphas, or DoRA: args.lora merges plain LoRA only")
    rank, alpha = settings.get("r"), settings.get("lora_alpha", settings.get("r"))
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
               for value in (rank, alpha)):
        raise ConfigError(f"{where} gives r={rank!r} and lora_alpha={alpha!r}: expected numbers > 0")
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def adapter_deltas(path: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Network weight name -> the change one adapter makes to it at scale 1 (`state`: the model states of a SAT
    checkpoint at `path`, when already read). A projection whose adapter covers only some of its partitions (a PEFT
    file adapting to_q alone) changes only those rows."""
    pieces: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    peft = peft_file(path)
    if peft is not None:
        tensors = read_safetensors(peft)  # a damaged file is named here, before its header is read
        metadata = {"lora_alpha": peft_scale(peft), "r": 1}
        for key, value in tensors.items():
            match = PEFT_LORA.match(key)
            if match:
                layer, target, matrix = match.groups()
                projection, partition = PEFT_ROWS[target]
                pieces[int(layer), projection][partition][matrix] = value
    else:
        file, state = (resolve_model_states(path), state) if state is not None else read_model_states(path)
        metadata = state.get(LORA_METADATA) or {}
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
        raise ConfigError("args.lora merges adapters into plain weights, and this model has LoRA layers (from "
                          "configs/lora.yaml, or for the adapters args.load holds): leave configs/lora.yaml out, or "
                          "merge args.load's adapters first (scripts/convert_weights.py lora-merge)")
    parameters = dict(network.named_parameters())
    for path, scale in adapters:
        for name, delta in adapter_deltas(path).items():
            if name not in parameters or parameters[name].shape != delta.shape:
                raise ConfigError(f"args.lora: {path} does not fit this model ({name})")
            parameters[name].add_(delta.to(parameters[name]) * scale)


def write_merged_checkpoint(checkpoint: str, out_dir: str | Path, lora_base: str | None = None,
                            scale: float = 1.0) -> None:
    """A LoRA checkpoint (satvideo's adapters over their base, or SAT's full LoRA layout) -> a plain SAT checkpoint,
    `{out_dir}/latest` and `{out_dir}/1/mp_rank_00_model_states.pt`, its projections holding the adapters merged at
    `scale`: what the official sampling (or a config without LoRA) loads. The folder appears whole or not at all."""
    file, state = read_model_states(checkpoint)
    record = state.get(LORA_METADATA)
    weights = network_state_dict(adapters_base(record, file, lora_base)) if record else network_weights(state, file)
    # SAT's full LoRA layout names a wrapped projection's base weight `P.original.weight`
    plain = {key.replace(".original.", "."): value for key, value in weights.items() if not is_lora_matrix(key)}
    for name, delta in adapter_deltas(checkpoint, state).items():
        if name not in plain or plain[name].shape != delta.shape:
            raise ConfigError(f"{file}: its adapters do not fit the base weights ({name})")
        plain[name] = (plain[name].float() + delta * scale).to(plain[name].dtype)
    with folder_replaced_atomically(out_dir) as partial:
        write_sat_checkpoint(partial, plain)
