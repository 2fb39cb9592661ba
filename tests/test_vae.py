"""The CogVideoX 3D causal VAE: causal convs, shapes, chunked causality, key layout, loading, training."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from satvideo.config import instantiate_from_config
from satvideo.data.toy import make_toy_dataset
from satvideo.vae import DiagonalGaussianRegularizer, VideoAutoencoder
from satvideo.vae.blocks import double_time, halve_time
from satvideo.vae.causal_conv import CausalConv3d, stream_over_time, streaming, time_chunks
from satvideo.vae.train import main as train_main
from satvideo.vae.train import reconstruction_mse, train_vae

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/tiny/vae.yaml").model.first_stage_config)


@pytest.fixture(scope="module")
def vae() -> VideoAutoencoder:
    torch.manual_seed(0)
    return instantiate_from_config(TINY_VAE).eval()


def random_video(frames: int, size: int = 32, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, frames, size, size) * 2 - 1


# --- causal convolution -------------------------------------------------------------------------

def test_causal_conv_pads_time_with_the_first_frame_and_space_with_zeros():
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, kernel_size=3)
    x = torch.randn(1, 2, 5, 6, 6)
    padded = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    expected = F.conv3d(padded, conv.conv.weight, conv.conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-6)


def test_causal_conv_output_does_not_see_later_frames():
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3)
    x = torch.randn(1, 2, 7, 5, 5)
    changed = x.clone()
    changed[:, :, 4:] = torch.randn_like(changed[:, :, 4:])
    y, y_changed = conv(x), conv(changed)
    assert torch.equal(y[:, :, :4], y_changed[:, :, :4])
    assert not torch.allclose(y[:, :, 4:], y_changed[:, :, 4:])


@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 5])
def test_causal_conv_streaming_equals_one_pass(chunk_frames):
    torch.manual_seed(0)
    convs = torch.nn.Sequential(CausalConv3d(2, 4), CausalConv3d(4, 4, kernel_size=1), CausalConv3d(4, 3))
    x = torch.randn(2, 2, 11, 6, 6)
    torch.testing.assert_close(stream_over_time(convs, x, chunk_frames), convs(x), rtol=0, atol=1e-5)
    assert all(conv.cache is None and not conv.streaming for conv in convs)


def test_streaming_clears_the_cache_after_an_error():
    conv = CausalConv3d(2, 2)
    with pytest.raises(RuntimeError, match="boom"), streaming(conv):
        conv(torch.randn(1, 2, 3, 4, 4))
        raise RuntimeError("boom")
    assert conv.cache is None and not conv.streaming


@pytest.mark.parametrize("num_frames, chunk_frames, expected", [
    (17, 8, [(0, 9), (9, 17)]),
    (5, 2, [(0, 3), (3, 5)]),
    (7, 2, [(0, 3), (3, 5), (5, 7)]),
    (3, 2, [(0, 3)]),
    (1, 2, [(0, 1)]),
    (5, 8, [(0, 5)]),
])
def test_time_chunks_put_the_remainder_first(num_frames, chunk_frames, expected):
    assert [(s.start, s.stop) for s in time_chunks(num_frames, chunk_frames)] == expected


def test_temporal_resampling_keeps_the_first_frame_alone():
    x = torch.arange(9.0).view(1, 1, 9, 1, 1)
    assert halve_time(x).flatten().tolist() == [0.0, 1.5, 3.5, 5.5, 7.5]
    assert halve_time(x[:, :, 1:]).flatten().tolist() == [1.5, 3.5, 5.5, 7.5]
    assert double_time(x[:, :, :3]).flatten().tolist() == [0.0, 1.0, 1.0, 2.0, 2.0]
    assert double_time(x[:, :, 1:3]).flatten().tolist() == [1.0, 1.0, 2.0, 2.0]


# --- whole model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("frames, latent_frames", [(1, 1), (9, 3), (17, 5)])
@torch.no_grad()
def test_shapes(vae, frames, latent_frames):
    z = vae.encode(random_video(frames, size=32, batch=2))
    assert z.shape == (2, 16, latent_frames, 4, 4)
    assert vae.decode(z).shape == (2, 3, frames, 32, 32)
    assert vae.decode(z, chunk_frames=None).shape == (2, 3, frames, 32, 32)


@torch.no_grad()
def test_non_square_frames(vae):
    z = vae.encode(random_video(9, size=48)[..., :32])
    assert z.shape == (1, 16, 3, 6, 4)
    assert vae.decode(z).shape == (1, 3, 9, 48, 32)


@torch.no_grad()
def test_chunked_encode_is_causal(vae):
    # chunks of 4 frames over 17 frames: [0:5] -> latents 0-1, [5:9] -> 2, [9:13] -> 3, [13:17] -> 4
    x = random_video(17)
    changed = x.clone()
    changed[:, :, 9:] = random_video(8)
    z, z_changed = vae.encode(x, sample=False, chunk_frames=4), vae.encode(changed, sample=False, chunk_frames=4)
    assert torch.equal(z[:, :, :3], z_changed[:, :, :3])
    assert not torch.allclose(z[:, :, 3:], z_changed[:, :, 3:])


@torch.no_grad()
def test_chunked_decode_is_causal(vae):
    # chunks of 2 latents over 7: [0:3] -> frames 0-8, [3:5] -> 9-16, [5:7] -> 17-24
    z = torch.randn(1, 16, 7, 4, 4)
    changed = z.clone()
    changed[:, :, 5:] = torch.randn(1, 16, 2, 4, 4)
    video, video_changed = vae.decode(z, chunk_frames=2), vae.decode(changed, chunk_frames=2)
    assert torch.equal(video[:, :, :17], video_changed[:, :, :17])
    assert not torch.allclose(video[:, :, 17:], video_changed[:, :, 17:])


@torch.no_grad()
def test_first_decoded_chunk_equals_decoding_those_latents_alone(vae):
    z = torch.randn(1, 16, 5, 4, 4)
    torch.testing.assert_close(vae.decode(z, chunk_frames=2)[:, :, :9], vae.decode(z[:, :, :3], chunk_frames=None),
                               rtol=0, atol=1e-5)


def test_chunk_frames_must_fit_the_temporal_compression(vae):
    with pytest.raises(ValueError, match="multiple of 2, got 3"):
        vae.decode(torch.randn(1, 16, 5, 4, 4), chunk_frames=3)
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        vae.encode(random_video(17), chunk_frames=6)
    with pytest.raises(ValueError, match=r"^chunk_frames must be a positive multiple of 4, got 4.0$"):
        vae.encode(random_video(17), chunk_frames=4.0)


def test_attention_resolutions_are_rejected():
    config = copy.deepcopy(TINY_VAE)
    config["params"]["encoder_config"]["params"]["attn_resolutions"] = [16]
    with pytest.raises(ValueError, match=r"attn_resolutions=\[16\]"):
        instantiate_from_config(config)


# --- official layout and loading ------------------------------------------------------------------

def test_state_dict_keys_follow_the_official_layout(vae):
    state = vae.state_dict()
    expected_shapes = {
        "encoder.conv_in.conv.weight": (16, 3, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (16,),
        "encoder.down.0.block.0.conv1.conv.weight": (16, 16, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (16, 16, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (32, 16, 1, 1, 1),
        "encoder.down.3.block.0.conv2.conv.bias": (64,),
        "encoder.mid.block_1.conv1.conv.weight": (64, 64, 3, 3, 3),
        "encoder.mid.block_2.norm2.bias": (64,),
        "encoder.norm_out.weight": (64,),
        "encoder.conv_out.conv.weight": (32, 64, 3, 3, 3),
        "decoder.conv_in.conv.weight": (64, 16, 3, 3, 3),
        "decoder.mid.block_1.norm1.norm_layer.weight": (64,),
        "decoder.mid.block_1.norm1.conv_y.conv.weight": (64, 16, 1, 1, 1),
        "decoder.mid.block_2.norm2.conv_b.conv.bias": (64,),
        "decoder.up.3.block.0.conv1.conv.weight": (64, 64, 3, 3, 3),
        "decoder.up.3.upsample.conv.weight": (64, 64, 3, 3),
        "decoder.up.2.block.0.nin_shortcut.weight": (32, 64, 1, 1, 1),
        "decoder.up.0.block.1.conv2.conv.weight": (16, 16, 3, 3, 3),
        "decoder.norm_out.norm_layer.weight": (16,),
        "decoder.norm_out.conv_y.conv.weight": (16, 16, 1, 1, 1),
        "decoder.conv_out.conv.weight": (3, 16, 3, 3, 3),
    }
    assert {key: tuple(state[key].shape) for key in expected_shapes if key in state} == expected_shapes
    # the last encoder level does not downsample, the full-resolution decoder level does not upsample
    assert "encoder.down.3.downsample.conv.weight" not in state
    assert "decoder.up.0.upsample.conv.weight" not in state
    # one resnet per encoder level, two per decoder level (num_res_blocks + 1)
    assert "encoder.down.0.block.1.conv1.conv.weight" not in state
    assert "decoder.up.0.block.2.conv1.conv.weight" not in state
    assert len(state) == 64 + 180  # counted by hand: encoder, decoder


def test_loads_official_checkpoint_and_drops_ignored_keys(vae, tmp_path):
    state = {key: torch.randn_like(value) for key, value in vae.state_dict().items()}
    state["loss.discriminator.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "3d-vae.pt")
    torch.save(state, tmp_path / "plain.pt")
    for path in ("3d-vae.pt", "plain.pt"):
        loaded = instantiate_from_config(TINY_VAE, ckpt_path=str(tmp_path / path))
        assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(RuntimeError, match="loss.discriminator.weight"):
        instantiate_from_config(TINY_VAE, ckpt_path=str(tmp_path / "plain.pt"), ignore_keys=[])


def test_missing_checkpoint_names_path_and_config_key(tmp_path):
    missing = tmp_path / "nowhere" / "3d-vae.pt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/3d-vae\.pt.*ckpt_path"):
        instantiate_from_config(TINY_VAE, ckpt_path=str(missing))


def test_official_config_targets_resolve():
    params = copy.deepcopy(TINY_VAE["params"])
    for part, name in (("encoder_config", "ContextParallelEncoder3D"), ("decoder_config", "ContextParallelDecoder3D")):
        params[part]["target"] = f"vae_modules.cp_enc_dec.{name}"
        params[part]["params"].update(resolution=256, gather_norm=True)
    params["regularizer_config"] = {"target": "vae_modules.regularizers.DiagonalGaussianRegularizer"}
    official = {
        "target": "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper",
        "params": dict(params, cp_size=1, loss_config={"target": "torch.nn.Identity"}),
    }
    vae = instantiate_from_config(official)
    assert isinstance(vae, VideoAutoencoder)
    assert isinstance(vae.regularization, DiagonalGaussianRegularizer)


# --- posterior ------------------------------------------------------------------------------------

def test_regularizer_mode_sample_and_kl():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    moments = torch.cat([mean, logvar], dim=1)
    regularizer = DiagonalGaussianRegularizer()

    assert torch.equal(regularizer(moments, sample=False), mean)
    assert torch.equal(DiagonalGaussianRegularizer(sample=False)(moments), mean)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected_kl = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).sum() / 2
    torch.testing.assert_close(regularizer.kl(moments), expected_kl)

    for call in (lambda: regularizer(moments), lambda: regularizer(moments, sample=True)):  # a draw by default
        torch.manual_seed(1)
        z = call()
        torch.manual_seed(1)
        torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


def test_encoding_computes_no_kl(vae, monkeypatch):
    def no_kl(moments):
        raise AssertionError("KL computed while encoding")

    monkeypatch.setattr(vae.regularization, "kl", no_kl)
    vae.encode(random_video(9, size=32))


def test_regularizer_clamps_log_variance():
    moments = torch.cat([torch.zeros(1, 1, 1, 1, 1), torch.full((1, 1, 1, 1, 1), 100.0)], dim=1)
    kl = DiagonalGaussianRegularizer.kl(moments)
    torch.testing.assert_close(kl, torch.tensor(0.5 * (torch.exp(torch.tensor(20.0)).item() - 1 - 20)))


# --- training -------------------------------------------------------------------------------------

def moving_squares(num: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Clips [num, 3, frames, size, size] in [-1, 1]: one coloured square sliding right on a dark background."""
    clips = torch.full((num, 3, frames, size, size), -0.9)
    side = size // 4
    for clip in clips:
        colour = torch.rand(3, 1, 1, generator=generator) * 1.6 - 0.6
        top = int(torch.randint(size - side, (1,), generator=generator))
        for t in range(frames):
            left = t * (size - side) // (frames - 1)
            clip[:, t, top : top + side, left : left + side] = colour
    return clips


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    clips = moving_squares(8, frames=9, size=32, generator=torch.Generator().manual_seed(0))
    vae = instantiate_from_config(TINY_VAE)
    before = reconstruction_mse(vae, clips)
    history = train_vae(vae, clips, iters=20, batch_size=2, lr=1e-3, log_every=1000)
    after = reconstruction_mse(vae, clips)
    assert len(history) == 20
    assert after < 0.3 * before, (before, after)


def test_train_command_saves_official_layout_and_overlay(tmp_path, monkeypatch):
    make_toy_dataset(tmp_path / "toy", num=2, size=32, frames=9)
    out, overlay = tmp_path / "vae" / "3d-vae.pt", tmp_path / "vae" / "vae.yaml"
    monkeypatch.setattr(sys, "argv", ["train", "--data", str(tmp_path / "toy"), "--out", str(out),
                                      "--overlay", str(overlay), "--config", str(ROOT / "configs/tiny/vae.yaml"),
                                      "--iters", "2", "--batch-size", "1"])
    train_main()
    saved = torch.load(out, weights_only=True)["state_dict"]
    assert saved.keys() == instantiate_from_config(TINY_VAE).state_dict().keys()
    ckpt_path = OmegaConf.load(overlay).model.first_stage_config.params.ckpt_path
    assert Path(ckpt_path) == out.resolve()
    loaded = instantiate_from_config(TINY_VAE, ckpt_path=ckpt_path)
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())


def test_the_streaming_cache_keeps_only_its_frames_alive():
    conv = CausalConv3d(2, 2)
    with streaming(conv):
        conv(torch.randn(1, 2, 6, 8, 8))
        # a copy of the last 2 frames, not a view pinning the whole padded input (8 frames)
        assert conv.cache.shape == (1, 2, 2, 8, 8)
        assert conv.cache.untyped_storage().nbytes() == conv.cache.numel() * conv.cache.element_size()


@torch.no_grad()
@pytest.mark.parametrize("frames, height, width", [(3, 24, 24), (1, 33, 33), (3, 40, 17), (1, 30, 45)])
def test_tiled_decode_matches_within_the_stated_tolerance(vae, frames, height, width):
    z = torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(height * width))
    full = vae.decode(z)
    tiled = vae.decode_tiled(z, tile=16, overlap=8)
    assert tiled.shape == full.shape
    # per-tile GroupNorm statistics (the README gives these figures, for these latents): the difference grows as
    # tiles shrink, hardly with the overlap; measured here 2.5-4.7% for 16-pixel tiles (up to 14% for other
    # latents), 1.3-2.4% for 24-pixel tiles
    assert (tiled - full).norm() / full.norm() < 0.06
    if max(height, width) > 24:
        assert (vae.decode_tiled(z, tile=24, overlap=8) - full).norm() / full.norm() < 0.03


def test_one_tile_is_untiled_decoding_and_bad_tiles_are_refused(vae):
    z = torch.randn(1, 16, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.decode_tiled(z[..., :16, :16], tile=16), vae.decode(z[..., :16, :16]))  # one tile
    with pytest.raises(ValueError, match=r"^tile=8 with overlap=8: need whole numbers, the tile larger than the "
                                         r"overlap and the overlap >= 0$"):
        vae.decode_tiled(z, tile=8, overlap=8)
    with pytest.raises(ValueError, match=r"^tile=8 with overlap=-2"):  # gaps between tiles, never covered
        vae.decode_tiled(z, tile=8, overlap=-2)
