"""CogVideoX VAE weights: official SAT `3d-vae.pt` layout <-> diffusers `AutoencoderKLCogVideoX`.

Pure key renaming; tensors are passed through untouched. SAT's `decoder.up.j` is indexed by
resolution level (0 = full resolution) while diffusers' `decoder.up_blocks.i` is in execution
order (0 = deepest), so j <-> num_levels - 1 - j.
"""
import re

from torch import Tensor

from satvideo.config import to_plain

# (SAT, diffusers) substrings. Mid blocks come first so that their `.block_1.` is renamed before
# the generic `.block.` rule could see it, in either direction.
_RENAMES = (
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("encoder.down.", "encoder.down_blocks."),
    (".block.", ".resnets."),
    (".downsample.", ".downsamplers.0."),
    (".upsample.", ".upsamplers.0."),
    (".nin_shortcut.", ".conv_shortcut."),
)
# Training-only entries of the official checkpoint (the discriminator / LPIPS loss).
SAT_ONLY_PREFIXES = ("loss.",)


def _num_up_levels(keys: list[str], pattern: str) -> int:
    levels = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    return max(levels) + 1 if levels else 0


def _reverse_up_index(key: str, old_prefix: str, new_prefix: str, num_levels: int) -> str:
    """`{old_prefix}.j.rest` -> `{new_prefix}.(num_levels - 1 - j).rest`; other keys unchanged."""
    match = re.match(rf"{re.escape(old_prefix)}\.(\d+)\.(.*)", key)
    if match is None:
        return key
    return f"{new_prefix}.{num_levels - 1 - int(match.group(1))}.{match.group(2)}"


def sat_vae_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official SAT VAE state dict -> `AutoencoderKLCogVideoX` state dict (loss.* dropped)."""
    num_levels = _num_up_levels(list(state_dict), r"decoder\.up\.(\d+)\.")
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(SAT_ONLY_PREFIXES):
            continue
        key = _reverse_up_index(key, "decoder.up", "decoder.up_blocks", num_levels)
        for sat, diffusers in _RENAMES:
            key = key.replace(sat, diffusers)
        converted[key] = value
    return converted


def diffusers_vae_to_sat(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`AutoencoderKLCogVideoX` state dict -> official SAT VAE state dict."""
    num_levels = _num_up_levels(list(state_dict), r"decoder\.up_blocks\.(\d+)\.")
    converted = {}
    for key, value in state_dict.items():
        key = _reverse_up_index(key, "decoder.up_blocks", "decoder.up", num_levels)
        for sat, diffusers in _RENAMES:
            key = key.replace(diffusers, sat)
        converted[key] = value
    return converted


# Encoder/decoder params that diffusers keeps once for both, with their defaults where optional.
_SHARED_PARAM_DEFAULTS = {"ch": None, "ch_mult": None, "num_res_blocks": None, "z_channels": None,
                          "norm_groups": 32, "temporal_compress_times": 4}


def _shared_params(encoder: dict, decoder: dict) -> dict:
    """The params diffusers shares between encoder and decoder; both sides must agree on them."""
    shared = {}
    for name, default in _SHARED_PARAM_DEFAULTS.items():
        in_encoder, in_decoder = encoder.get(name, default), decoder.get(name, default)
        if name == "ch_mult":  # a list from YAML, maybe a tuple from Python
            in_encoder, in_decoder = list(in_encoder), list(in_decoder)
        if in_encoder != in_decoder:
            raise ValueError(f"diffusers needs the same {name} in encoder and decoder, "
                             f"got {in_encoder} and {in_decoder}")
        shared[name] = in_encoder
    return shared


def diffusers_vae_config(sat_encoder_params: dict, sat_decoder_params: dict,
                         scaling_factor: float | None = None) -> dict:
    """`AutoencoderKLCogVideoX` config for the SAT encoder/decoder `params` of an official YAML."""
    encoder, decoder = to_plain(sat_encoder_params), to_plain(sat_decoder_params)
    shared = _shared_params(encoder, decoder)
    num_levels = len(shared["ch_mult"])
    config = {
        "in_channels": encoder.get("in_channels", 3),
        "out_channels": decoder.get("out_ch", 3),
        "down_block_types": ["CogVideoXDownBlock3D"] * num_levels,
        "up_block_types": ["CogVideoXUpBlock3D"] * num_levels,
        "block_out_channels": [shared["ch"] * m for m in shared["ch_mult"]],
        "latent_channels": shared["z_channels"],
        "layers_per_block": shared["num_res_blocks"],
        "norm_num_groups": shared["norm_groups"],
        "temporal_compression_ratio": shared["temporal_compress_times"],
    }
    if scaling_factor is not None:
        config["scaling_factor"] = scaling_factor
    return config
