"""Our VAE against diffusers' independent `AutoencoderKLCogVideoX`, with converted weights.

diffusers encodes in chunks of `num_sample_frames_batch_size` (8) frames and decodes in chunks of
`num_latent_frames_batch_size` (2) latent frames, the first chunk taking the remainder, with a
causal conv cache; GroupNorm statistics are per chunk. Our `encode(chunk_frames=...)` and
`decode(chunk_frames=...)` chunk the same way, so each comparison sets both sides to the same
chunking; one-pass runs set diffusers' batch sizes above the frame count.
"""
import copy
import inspect
from pathlib import Path

import pytest
import torch
from convert_helpers import relative_error
from diffusers import AutoencoderKLCogVideoX
from omegaconf import OmegaConf

from satvideo.config import instantiate_from_config
from satvideo.convert.vae import diffusers_vae_config, diffusers_vae_to_sat, sat_vae_to_diffusers
from satvideo.vae import VideoAutoencoder

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/tiny/vae.yaml").model.first_stage_config)
ONE_PASS = 10_000  # a diffusers frame batch size larger than any clip here


def with_ch_mult(config: dict, ch_mult: list[int]) -> dict:
    config = copy.deepcopy(config)
    for part in ("encoder_config", "decoder_config"):
        config["params"][part]["params"]["ch_mult"] = ch_mult
    return config


def converted_pair(config: dict) -> tuple[VideoAutoencoder, AutoencoderKLCogVideoX]:
    """Our VAE with random weights (norm affines too) and a diffusers VAE loaded from them."""
    torch.manual_seed(0)
    ours = instantiate_from_config(config).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    params = config["params"]
    theirs = AutoencoderKLCogVideoX(
        **diffusers_vae_config(params["encoder_config"]["params"], params["decoder_config"]["params"])
    ).eval()
    theirs.load_state_dict(sat_vae_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


@pytest.fixture(scope="module")
def pair() -> tuple[VideoAutoencoder, AutoencoderKLCogVideoX]:
    return converted_pair(TINY_VAE)


def test_converted_keys_match_a_diffusers_model_exactly(pair):
    ours, theirs = pair
    assert sorted(sat_vae_to_diffusers(ours.state_dict())) == sorted(theirs.state_dict())
    assert sorted(diffusers_vae_to_sat(theirs.state_dict())) == sorted(ours.state_dict())


def test_key_mapping_examples(pair):
    ours, _ = pair
    renamed = dict(zip(ours.state_dict(), sat_vae_to_diffusers(ours.state_dict())))
    examples = {
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down.0.downsample.conv.weight": "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid.block_2.conv1.conv.weight": "encoder.mid_block.resnets.1.conv1.conv.weight",
        "decoder.mid.block_1.norm1.conv_y.conv.weight": "decoder.mid_block.resnets.0.norm1.conv_y.conv.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up.0.block.1.norm2.norm_layer.weight": "decoder.up_blocks.3.resnets.1.norm2.norm_layer.weight",
        "decoder.norm_out.conv_b.conv.bias": "decoder.norm_out.conv_b.conv.bias",
    }
    assert {sat: renamed[sat] for sat in examples} == examples


def test_round_trips_are_bit_exact_and_loss_keys_are_dropped(pair):
    ours, theirs = pair
    sat_state = dict(ours.state_dict(), **{"loss.logvar": torch.zeros(())})
    back = diffusers_vae_to_sat(sat_vae_to_diffusers(sat_state))
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in ours.state_dict().items())
    diffusers_state = theirs.state_dict()
    again = sat_vae_to_diffusers(diffusers_vae_to_sat(diffusers_state))
    assert again.keys() == diffusers_state.keys()
    assert all(torch.equal(again[key], value) for key, value in diffusers_state.items())


def test_up_block_order_follows_the_number_of_levels():
    ours, theirs = converted_pair(with_ch_mult(TINY_VAE, [1, 2, 4]))  # 3 levels: up.j <-> up_blocks.(2 - j)
    renamed = dict(zip(ours.state_dict(), sat_vae_to_diffusers(ours.state_dict())))
    assert renamed["decoder.up.2.upsample.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    with torch.no_grad():
        x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
        z = ours.encode(x, sample=False)
        assert z.shape == (1, 16, 3, 4, 4)
        assert relative_error(z, theirs.encode(x).latent_dist.mean) <= 1e-4
        assert relative_error(ours.decode(z), theirs.decode(z).sample) <= 1e-4


@pytest.mark.parametrize("frames, chunk_frames", [(1, None), (9, None), (17, None), (17, 8), (17, 4), (25, 8)])
@torch.no_grad()
def test_encode_matches_diffusers(pair, frames, chunk_frames):
    ours, theirs = pair
    theirs.num_sample_frames_batch_size = chunk_frames or ONE_PASS
    x = torch.rand(2, 3, frames, 32, 32) * 2 - 1
    expected = theirs.encode(x).latent_dist.mean
    assert relative_error(ours.encode(x, sample=False, chunk_frames=chunk_frames), expected) <= 1e-4


@pytest.mark.parametrize("latent_frames, chunk_frames", [(1, 2), (3, None), (5, None), (5, 2), (7, 2), (7, 4)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, latent_frames, chunk_frames):
    ours, theirs = pair
    theirs.num_latent_frames_batch_size = chunk_frames or ONE_PASS
    z = torch.randn(2, 16, latent_frames, 4, 4)
    expected = theirs.decode(z).sample
    assert expected.shape[2] == 4 * latent_frames - 3
    assert relative_error(ours.decode(z, chunk_frames=chunk_frames), expected) <= 1e-4


@torch.no_grad()
def test_chunking_changes_the_result_like_in_diffusers(pair):
    """Per-chunk GroupNorm statistics make chunked and one-pass decoding differ, on both sides alike."""
    ours, theirs = pair
    z = torch.randn(1, 16, 5, 4, 4)
    assert relative_error(ours.decode(z, chunk_frames=2), ours.decode(z, chunk_frames=None)) > 1e-3
    theirs.num_latent_frames_batch_size = 2
    assert relative_error(ours.decode(z, chunk_frames=2), theirs.decode(z).sample) <= 1e-4


def test_diffusers_config_for_the_official_model():
    official = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 2, 4], attn_resolutions=[], num_res_blocks=3, dropout=0.0)
    config = diffusers_vae_config(dict(official, gather_norm=True), dict(official, gather_norm=False), 0.7)
    # diffusers' defaults describe the released CogVideoX VAE
    defaults = {name: p.default for name, p in inspect.signature(AutoencoderKLCogVideoX.__init__).parameters.items()}
    released = {key: list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key] for key in config}
    assert config == dict(released, scaling_factor=0.7)


def test_diffusers_config_needs_matching_encoder_and_decoder():
    params = TINY_VAE["params"]
    decoder = dict(params["decoder_config"]["params"], num_res_blocks=2)
    with pytest.raises(ValueError, match="same num_res_blocks"):
        diffusers_vae_config(params["encoder_config"]["params"], decoder)
