"""The engine (what is trained and saved, latents, image conditioning, sampling) and the text conditioner."""

import pytest
import torch
from conftest import tiny_network_config

from satvideo.conditioner import FrozenT5Embedder, GeneralConditioner, TinyT5Embedder
from satvideo.config import ConfigError, load_config, to_plain
from satvideo.engine import VideoDiffusionEngine

TINY = ["configs/tiny/model.yaml", "configs/tiny/vae.yaml"]


def tiny_engine(**model_overrides) -> VideoDiffusionEngine:
    model = to_plain(load_config(TINY).model)
    model.update(model_overrides)
    torch.manual_seed(0)
    return VideoDiffusionEngine.from_config(model)


def test_only_the_network_is_trained_and_saved():
    engine = tiny_engine()
    assert all(key.startswith("model.diffusion_model.") for key in engine.state_dict())
    network_parameters = {id(p) for p in engine.network.parameters()}
    assert {id(p) for p in engine.parameters()} == network_parameters
    assert not any(p.requires_grad for p in engine.conditioner.parameters())
    assert not any(p.requires_grad for p in engine.first_stage_model.parameters())


def test_moving_the_engine_moves_the_frozen_parts_too():
    engine = tiny_engine().to(torch.float64)
    assert next(engine.conditioner.parameters()).dtype == torch.float64
    assert next(engine.first_stage_model.parameters()).dtype == torch.float64


def test_training_loss_has_gradients_only_for_the_network():
    engine = tiny_engine()
    video = torch.rand(2, 9, 3, 32, 32) * 2 - 1
    loss = engine({"mp4": video, "txt": ["a red square moving left", "a blue circle moving up"]})
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert engine.network.mixins.final_layer.linear.weight.grad.abs().sum() > 0


def test_latents_round_trip_shapes_and_scale_factor():
    engine = tiny_engine(scale_factor=0.5)
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    latents = engine.encode_first_stage(video, sample=False)
    assert latents.shape == (1, 3, 16, 4, 4)
    unscaled = engine.first_stage_model.encode(video.permute(0, 2, 1, 3, 4), sample=False).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(latents, unscaled * 0.5)
    assert engine.decode_first_stage(latents).shape == (1, 9, 3, 32, 32)
    # chunk_frames None is one pass, also where a sequence-parallel group would share the chunks out
    one_pass = engine.decode_first_stage(latents, chunk_frames=None)
    assert torch.equal(engine.decode_first_stage(latents, chunk_frames=None, context_group=object()), one_pass)


def test_encode_chunk_frames_is_checked_when_the_engine_is_built():
    """Not at the first batch: the VAE's temporal compression (4) is known as soon as it is built."""
    with pytest.raises(ConfigError, match=r"^model.encode_chunk_frames must be a positive multiple of 4, got 6$"):
        tiny_engine(encode_chunk_frames=6)
    video = torch.rand(1, 17, 3, 32, 32) * 2 - 1
    chunked = tiny_engine(encode_chunk_frames=8).encode_first_stage(video, sample=False)
    assert chunked.shape == (1, 5, 16, 4, 4)


def vae_moments(engine, video):
    """Posterior mean and std of the VAE, [B, T', C, h, w] each, by hand from the encoder's moments."""
    moments = engine.first_stage_model.encoder(video.permute(0, 2, 1, 3, 4))
    mean, logvar = moments.chunk(2, dim=1)
    return mean.permute(0, 2, 1, 3, 4), torch.exp(0.5 * logvar.clamp(-30, 20)).permute(0, 2, 1, 3, 4)


def test_training_latents_are_a_posterior_draw_as_in_the_original():
    engine = tiny_engine(scale_factor=0.5)
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    mean, std = vae_moments(engine, video)
    torch.manual_seed(3)
    drawn = engine.encode_first_stage(video)
    torch.manual_seed(3)
    noise = torch.randn_like(mean.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(drawn, (mean + std * noise) * 0.5)
    assert not torch.allclose(drawn, mean * 0.5)


def test_posterior_mean_is_an_option_of_the_regularizer():
    model = to_plain(load_config(TINY).model)
    model["first_stage_config"]["params"]["regularizer_config"] = {
        "target": "vae_modules.regularizers.DiagonalGaussianRegularizer", "params": {"sample": False}}
    engine = tiny_engine(scale_factor=0.5, first_stage_config=model["first_stage_config"])
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    mean, _ = vae_moments(engine, video)
    torch.testing.assert_close(engine.encode_first_stage(video), mean * 0.5)


def test_latent_input_is_multiplied_by_the_scale_factor(monkeypatch):
    engine = tiny_engine(scale_factor=0.7, latent_input=True)
    seen = {}
    monkeypatch.setattr(engine, "loss_fn", lambda network, denoiser, cond, x: seen.setdefault("x", x).sum())
    latents = torch.randn(2, 3, 16, 4, 4)
    engine({"mp4": latents, "txt": ["a", "b"]})
    torch.testing.assert_close(seen["x"], latents * 0.7)


def test_image_to_video_conditioning_is_first_frame_latent_then_zeros():
    engine = tiny_engine()
    frame = torch.rand(2, 3, 32, 32) * 2 - 1
    condition = engine.image_condition(frame, num_latent_frames=3, noise_images=False)
    assert condition.shape == (2, 3, 16, 4, 4)
    torch.testing.assert_close(condition[:, :1], engine.encode_first_stage(frame[:, None], sample=False))
    assert condition[:, 1:].abs().max() == 0


def test_temporal_patch_padding_repeats_the_first_latent_frame():
    model = to_plain(load_config(TINY).model)
    model["network_config"] = tiny_network_config("1.5_5b")
    model["network_config"]["params"]["modules"]["patch_embed_config"]["params"]["text_hidden_size"] = 32
    model["network_config"]["params"]["modules"]["pos_embed_config"]["params"]["text_length"] = 32
    engine = VideoDiffusionEngine.from_config(model)
    latents = torch.randn(1, 3, 16, 4, 4)
    padded = engine.pad_to_temporal_patch(latents)
    assert padded.shape[1] == 4 and torch.equal(padded[:, 0], latents[:, 0]) and torch.equal(padded[:, 1:], latents)
    generated = engine.sample(["a red square"], (3, 16, 4, 4), torch.Generator().manual_seed(0))
    assert generated.shape == (1, 3, 16, 4, 4)  # sampled 4 frames, the padding frame dropped


def test_sampling_is_reproducible_from_the_seed():
    engine = tiny_engine()
    engine.sampler.num_steps = 3
    first = engine.sample(["a red square moving left"], (3, 16, 4, 4), torch.Generator().manual_seed(7))
    second = engine.sample(["a red square moving left"], (3, 16, 4, 4), torch.Generator().manual_seed(7))
    other = engine.sample(["a red square moving left"], (3, 16, 4, 4), torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_a_bf16_model_samples_from_fp32_noise_with_an_fp32_state_as_the_original():
    engine = tiny_engine().to(torch.bfloat16)
    engine.sampler.num_steps = 2
    states = []

    def denoise(network, x, alpha, cond, **kwargs):  # keeps the sampling state handed to it at each step
        states.append(x)
        return torch.zeros_like(x)

    engine.denoiser.forward = denoise
    engine.sample(["a red square"], (3, 16, 4, 4), torch.Generator().manual_seed(7))
    noise = torch.randn((1, 3, 16, 4, 4), generator=torch.Generator().manual_seed(7))  # fp32, as the original draws
    assert len(states) == 2 and all(state.dtype == torch.float32 for state in states)
    assert torch.equal(states[0][:1], noise)  # the first step's state is the noise itself ([uncond; cond] batch)


def test_image_to_video_model_requires_a_first_frame():
    engine = tiny_engine(noised_image_input=True)
    with pytest.raises(ValueError, match="image-to-video model: give a first frame"):
        engine.sample(["a red square"], (3, 16, 4, 4), torch.Generator().manual_seed(0))


def test_tiny_t5_is_identical_in_every_process_and_depends_on_the_prompt():
    torch.manual_seed(1)
    first = TinyT5Embedder(max_length=16)(["a red square", "a blue circle"])
    torch.manual_seed(2)
    second = TinyT5Embedder(max_length=16)(["a red square", "a blue circle"])
    assert first.shape == (2, 16, 32)
    torch.testing.assert_close(first, second)
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_guidance_dropout_zeroes_whole_samples_at_the_configured_rate():
    conditioner = GeneralConditioner([{"target": "satvideo.conditioner.TinyT5Embedder", "input_key": "txt",
                                       "ucg_rate": 0.5, "params": {"max_length": 8}}])
    torch.manual_seed(0)
    features = conditioner({"txt": ["a red square"] * 400}, drop_for_guidance=True)["crossattn"]
    dropped = (features.flatten(1).abs().sum(1) == 0).float()
    assert 0.4 < dropped.mean() < 0.6
    kept = conditioner({"txt": ["a red square"] * 4})["crossattn"]
    assert (kept.flatten(1).abs().sum(1) > 0).all()
    assert GeneralConditioner.unconditional({"crossattn": kept})["crossattn"].abs().max() == 0


def test_missing_t5_directory_names_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"emb_models\[0\]: FrozenT5Embedder params.model_dir='.*no_t5' is not a directory"):
        GeneralConditioner([{"target": "sgm.modules.encoders.modules.FrozenT5Embedder",
                             "params": {"model_dir": str(tmp_path / "no_t5")}}])


def test_local_t5_directory_loads_without_network(tmp_path):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    embedder = FrozenT5Embedder(str(tmp_path), max_length=12)
    assert embedder(["hello"]).shape == (1, 12, 16)
    assert not any(p.requires_grad for p in embedder.parameters())


def test_text_to_video_model_refuses_a_first_frame_and_latent_input_refuses_image_conditioning():
    engine = tiny_engine()
    with pytest.raises(ValueError, match="text-to-video model .* takes no first frame"):
        engine.sample(["a red square"], (3, 16, 4, 4), torch.Generator().manual_seed(0),
                      first_frames=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="model.noised_image_input with model.latent_input"):
        tiny_engine(noised_image_input=True, latent_input=True)
