"""CogVideoX transformer: satvideo (official SAT key layout) <-> diffusers `CogVideoXTransformer3DModel`.

State dicts use satvideo's keys, i.e. the official SAT keys without the `model.diffusion_model.` prefix.
Most tensors are only renamed; two are split (SAT stacks q, k, v in one projection and all twelve adaLN
chunks of a layer in one Linear) and one may be added (diffusers' 1.5 patch Linear always has a bias).
Nothing here imports diffusers.
"""

from __future__ import annotations

import logging
import re

import torch

from satvideo.config import is_whole_number, resolve_target, to_plain
from satvideo.dit.patch_embed import split_patch_size

logger = logging.getLogger(__name__)

# (SAT prefix, diffusers prefix); `{i}` stands for a layer index.
RENAMES = (
    ("transformer.layers.{i}.input_layernorm.", "transformer_blocks.{i}.norm1.norm."),
    ("transformer.layers.{i}.attention.dense.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("transformer.layers.{i}.post_attention_layernorm.", "transformer_blocks.{i}.norm2.norm."),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.", "transformer_blocks.{i}.ff.net.2."),
    ("mixins.adaln_layer.query_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_q."),
    ("mixins.adaln_layer.key_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_k."),
    ("transformer.final_layernorm.", "norm_final."),
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("ofs_embed.0.", "ofs_embedding.linear_1."),
    ("ofs_embed.2.", "ofs_embedding.linear_2."),
    ("mixins.patch_embed.proj.", "patch_embed.proj."),
    ("mixins.patch_embed.text_proj.", "patch_embed.text_proj."),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),
    ("mixins.final_layer.norm_final.", "norm_out.norm."),
    ("mixins.final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("mixins.final_layer.linear.", "proj_out."),
)
SAT_QKV = re.compile(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")
SAT_MODULATION = re.compile(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
DIFFUSERS_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)$")
DIFFUSERS_MODULATION = re.compile(r"transformer_blocks\.(\d+)\.norm([12])\.linear\.(weight|bias)$")
SAT_LAYER_INDEX = re.compile(r"(?:transformer\.layers|mixins\.adaln_layer\.\w+)\.(\d+)\.")

# Options diffusers' CogVideoX exposes but every CogVideoX model (and satvideo) fixes.
FIXED_DIFFUSERS_OPTIONS = {"activation_fn": "gelu-approximate", "timestep_activation_fn": "silu",
                           "flip_sin_to_cos": True, "freq_shift": 0, "attention_bias": True}
# diffusers has one eps for norm1/norm2.norm, norm_final and norm_out.norm. SAT's BaseTransformer builds the block
# LayerNorms and final_layernorm with eps=layernorm_epsilon (default 1e-5), which overrides the eps=1e-6 bound
# into the layernorm class; 1e-5 (also the official diffusers configs' value) matches those. The final layer's own
# norm keeps SAT's 1e-6, a relative ~5e-6 difference in the output; qk-norms use 1e-6 on both sides.
SAT_NORM_EPS = 1e-5
SINCOS_TARGET = "satvideo.dit.SinCos3DPositionMixin"
ROTARY_TARGET = "satvideo.dit.Rotary3DPositionMixin"
# SAT BaseTransformer options as in the official configs; activation checkpointing is a training choice, off here.
SAT_TRANSFORMER_ARGS = {"checkpoint_activations": False, "vocab_size": 1, "max_sequence_length": 64,
                        "layernorm_order": "pre", "skip_init": False, "model_parallel_size": 1, "is_decoder": False}


def _prefix_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


SAT_TO_DIFFUSERS = [(_prefix_pattern(sat), diffusers) for sat, diffusers in RENAMES]
DIFFUSERS_TO_SAT = [(_prefix_pattern(diffusers), sat) for sat, diffusers in RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            layer = match.groupdict().get("i")
            return (target.replace("{i}", layer) if layer else target) + key[match.end():]
    return None


def _unknown_keys_error(keys: list[str], layout: str) -> ValueError:
    hint = ""
    if any("matrix_A" in key or "matrix_B" in key or ".original." in key for key in keys):
        hint = " (LoRA weights: export the adapter with `convert_weights.py lora-to-diffusers`)"
    return ValueError(f"{len(keys)} keys are not part of the {layout} transformer layout{hint}: {', '.join(keys[:10])}")


def sat_to_diffusers_transformer(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """satvideo/SAT transformer state dict (no `model.diffusion_model.` prefix) -> diffusers state dict."""
    layers = {int(match.group(1)) for key in state_dict if (match := SAT_LAYER_INDEX.match(key))}
    if layers != set(range(num_layers)):
        raise ValueError(f"expected layers 0..{num_layers - 1}, the state dict has layers {sorted(layers)}")
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if match := SAT_QKV.match(key):
            layer, kind = match.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                converted[f"transformer_blocks.{layer}.attn1.to_{name}.{kind}"] = part.clone()
        elif match := SAT_MODULATION.match(key):
            layer, kind = match.groups()
            chunks = value.chunk(12, dim=0)  # video attn (shift, scale, gate), video mlp, text attn, text mlp
            converted[f"transformer_blocks.{layer}.norm1.linear.{kind}"] = torch.cat(chunks[0:3] + chunks[6:9])
            converted[f"transformer_blocks.{layer}.norm2.linear.{kind}"] = torch.cat(chunks[3:6] + chunks[9:12])
        elif (name := _rename(key, SAT_TO_DIFFUSERS)) is not None:
            converted[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(unknown, "satvideo/SAT")
    patch_weight = converted["patch_embed.proj.weight"]
    if patch_weight.dim() == 2 and "patch_embed.proj.bias" not in converted:
        # diffusers' 1.5 patch Linear always has a bias; a SAT config with `bias: false` has none.
        converted["patch_embed.proj.bias"] = patch_weight.new_zeros(patch_weight.shape[0])
    return converted


def diffusers_to_sat_transformer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `CogVideoXTransformer3DModel` state dict -> satvideo/SAT state dict (no prefix)."""
    converted, qkv, modulation, unknown = {}, {}, {}, []
    for key, value in state_dict.items():
        if match := DIFFUSERS_QKV.match(key):
            layer, name, kind = match.groups()
            qkv.setdefault((layer, kind), {})[name] = value
        elif match := DIFFUSERS_MODULATION.match(key):
            layer, norm, kind = match.groups()
            modulation.setdefault((layer, kind), {})[norm] = value
        elif (name := _rename(key, DIFFUSERS_TO_SAT)) is not None:
            converted[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(unknown, "diffusers CogVideoX")
    for (layer, kind), parts in qkv.items():
        converted[f"transformer.layers.{layer}.attention.query_key_value.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    for (layer, kind), norms in modulation.items():
        video_attn, text_attn = norms["1"].chunk(2)  # each (shift, scale, gate)
        video_mlp, text_mlp = norms["2"].chunk(2)
        converted[f"mixins.adaln_layer.adaLN_modulations.{layer}.1.{kind}"] = torch.cat(
            [video_attn, video_mlp, text_attn, text_mlp])
    return converted


def _check_convertible(params: dict) -> None:
    """Raise for satvideo options that diffusers' CogVideoX cannot express."""
    modules = params["modules"]
    pos = modules["pos_embed_config"].get("params") or {}
    adaln = modules["adaln_layer_config"].get("params") or {}
    problems = {
        "use_SwiGLU": params.get("use_SwiGLU", False),
        "use_RMSNorm": params.get("use_RMSNorm", False),
        "elementwise_affine=false": not params.get("elementwise_affine", True),
        "adaln_layer_config.params.qk_ln=false": not adaln.get("qk_ln", True),
        "pos_embed_config.params.rot_v": pos.get("rot_v", False),
        "pos_embed_config.params.theta != 10000": pos.get("theta", 10000.0) != 10000.0,
        "ofs_embed_dim != time_embed_dim": bool(params.get("ofs_embed_dim"))
        and params["ofs_embed_dim"] != (params.get("time_embed_dim") or params["hidden_size"]),
    }
    unsupported = [name for name, present in problems.items() if present]
    if unsupported:
        raise ValueError(f"diffusers' CogVideoXTransformer3DModel has no counterpart for: {', '.join(unsupported)}")


def diffusers_transformer_config(network_params: dict) -> dict:
    """`CogVideoXTransformer3DModel` init arguments for a satvideo `network_config.params` (e.g. a family YAML)."""
    params = to_plain(network_params)
    _check_convertible(params)
    modules = params["modules"]
    pos_target = resolve_target(modules["pos_embed_config"]["target"])
    pos = modules["pos_embed_config"].get("params") or {}
    patch = modules["patch_embed_config"].get("params") or {}
    patch_t, patch_size = split_patch_size(params["patch_size"])
    hidden, heads = params["hidden_size"], params["num_attention_heads"]
    config = {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": params["in_channels"],
        "out_channels": params["out_channels"],
        "time_embed_dim": params.get("time_embed_dim") or hidden,
        "ofs_embed_dim": params.get("ofs_embed_dim") or None,
        "text_embed_dim": patch["text_hidden_size"],
        "num_layers": params["num_layers"],
        "sample_width": params["latent_width"],
        "sample_height": params["latent_height"],
        "sample_frames": params["num_frames"],
        "patch_size": patch_size,
        "patch_size_t": patch_t if isinstance(params["patch_size"], list) else None,
        "temporal_compression_ratio": params["time_compressed_rate"],
        "max_text_seq_length": pos["text_length"],
        "norm_elementwise_affine": params.get("elementwise_affine", True),
        "norm_eps": SAT_NORM_EPS,
        "use_rotary_positional_embeddings": pos_target == ROTARY_TARGET,
        "use_learned_positional_embeddings": bool(pos.get("learnable_pos_embed", False)),
        # diffusers applies patch_bias to its Conv2d (1.0) only; its 1.5 Linear always has a bias, and the
        # official 1.5 configs say false.
        "patch_bias": False if isinstance(params["patch_size"], list) else patch.get("bias", True),
        **FIXED_DIFFUSERS_OPTIONS,
    }
    if pos_target == SINCOS_TARGET:
        height, width = pos.get("height_interpolation", 1.0), pos.get("width_interpolation", 1.0)
        if height != width:
            raise ValueError(f"diffusers has one spatial interpolation scale; height_interpolation {height} "
                             f"and width_interpolation {width} differ")
        config["spatial_interpolation_scale"] = height
        config["temporal_interpolation_scale"] = pos.get("time_interpolation", 1.0)
    elif pos_target != ROTARY_TARGET:
        raise ValueError(f"position embedding {pos_target!r} has no diffusers counterpart")
    return config


# the sizes a diffusers transformer config must give
DIFFUSERS_SIZES = ("num_attention_heads", "attention_head_dim", "patch_size", "max_text_seq_length", "text_embed_dim",
                   "time_embed_dim", "sample_frames", "sample_width", "sample_height", "num_layers", "in_channels",
                   "out_channels")


def network_config_from_diffusers(config: dict) -> dict:
    """satvideo `{target, params}` network config (official-style targets) for a diffusers transformer config."""
    for name in DIFFUSERS_SIZES:
        if not is_whole_number(config.get(name)) or config[name] < 1:
            raise ValueError(f"diffusers config {name}={config.get(name)!r}: expected a whole number >= 1")
    for name, value in FIXED_DIFFUSERS_OPTIONS.items():
        if config.get(name, value) != value:
            raise ValueError(f"diffusers config {name}={config[name]!r}: satvideo supports only {value!r}")
    if config.get("norm_eps", SAT_NORM_EPS) != SAT_NORM_EPS:
        logger.warning("diffusers config norm_eps=%s: satvideo's block LayerNorms use %s (SAT's default)",
                       config["norm_eps"], SAT_NORM_EPS)
    heads, head_dim, patch = config["num_attention_heads"], config["attention_head_dim"], config["patch_size"]
    text_length = config["max_text_seq_length"]
    if config.get("use_rotary_positional_embeddings", False):  # diffusers' default
        pos_embed = {"target": "dit_video_concat.Rotary3DPositionEmbeddingMixin",
                     "params": {"hidden_size_head": head_dim, "text_length": text_length}}
        if config.get("use_learned_positional_embeddings"):
            pos_embed["params"]["learnable_pos_embed"] = True
    else:
        spatial = config.get("spatial_interpolation_scale", 1.875)
        pos_embed = {"target": "dit_video_concat.Basic3DPositionEmbeddingMixin",
                     "params": {"text_length": text_length, "height_interpolation": spatial,
                                "width_interpolation": spatial,
                                "time_interpolation": config.get("temporal_interpolation_scale", 1.0)}}
    patch_params = {"text_hidden_size": config["text_embed_dim"]}
    if not config.get("patch_bias", True) and config.get("patch_size_t") is None:
        patch_params["bias"] = False
    params = {
        "time_embed_dim": config["time_embed_dim"],
        "elementwise_affine": config.get("norm_elementwise_affine", True),
        "num_frames": config["sample_frames"],
        "time_compressed_rate": config.get("temporal_compression_ratio", 4),
        "latent_width": config["sample_width"],
        "latent_height": config["sample_height"],
        "num_layers": config["num_layers"],
        "patch_size": [config["patch_size_t"], patch, patch] if config.get("patch_size_t") else patch,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "hidden_size": heads * head_dim,
        "num_attention_heads": heads,
        "transformer_args": dict(SAT_TRANSFORMER_ARGS),
        "modules": {
            "pos_embed_config": pos_embed,
            "patch_embed_config": {"target": "dit_video_concat.ImagePatchEmbeddingMixin", "params": patch_params},
            "adaln_layer_config": {"target": "dit_video_concat.AdaLNMixin", "params": {"qk_ln": True}},
            "final_layer_config": {"target": "dit_video_concat.FinalLayerMixin"},
        },
    }
    if config.get("ofs_embed_dim"):
        params["ofs_embed_dim"] = config["ofs_embed_dim"]
    return {"target": "dit_video_concat.DiffusionTransformer", "params": params}
