"""Transformer weight conversion satvideo (SAT layout) <-> diffusers, proven by equal outputs on tiny random models."""

import os

import pytest
import torch
from conftest import ROOT, family_config, script_error, tiny_inputs
from convert_helpers import (diffusers_output, parity_network_config, randomize, relative_error, run_cli,
                             write_sat_checkpoint)
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from omegaconf import OmegaConf
from safetensors.torch import load_file

from satvideo.atomic_files import folder_replaced_atomically
from satvideo.config import instantiate_from_config, load_config, to_plain
from satvideo.convert.checkpoints import WEIGHTS_NAME, diffusers_to_sat_checkpoint, write_diffusers_folders
from satvideo.convert.transformer import (diffusers_to_sat_transformer, diffusers_transformer_config,
                                          network_config_from_diffusers, sat_to_diffusers_transformer)
from satvideo.convert.vae import sat_vae_to_diffusers
from satvideo.checkpoint import load_network

# Values of the official diffusers configs (THUDM/CogVideoX-2b, -5b, -5b-I2V, CogVideoX1.5-5B, -5B-I2V).
OFFICIAL = {
    "2b": dict(num_attention_heads=30, num_layers=30, in_channels=16, use_rotary_positional_embeddings=False,
               spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0, patch_size_t=None),
    "5b": dict(num_attention_heads=48, num_layers=42, in_channels=16, use_rotary_positional_embeddings=True,
               use_learned_positional_embeddings=False, patch_size_t=None),
    "5b_i2v": dict(num_attention_heads=48, num_layers=42, in_channels=32, use_learned_positional_embeddings=True),
    "1.5_5b": dict(num_attention_heads=48, in_channels=16, patch_size_t=2, patch_bias=False, ofs_embed_dim=None),
    "1.5_5b_i2v": dict(num_attention_heads=48, in_channels=32, patch_size_t=2, patch_bias=False, ofs_embed_dim=512),
}


def random_network(family: str, num_layers: int = 2, seed: int = 0):
    return randomize(instantiate_from_config(parity_network_config(family, num_layers)), seed)


def random_diffusers_model(config: dict, seed: int = 1) -> CogVideoXTransformer3DModel:
    return randomize(CogVideoXTransformer3DModel(**config), seed)


def assert_equal_state_dicts(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, f"tensors differ: {different}"


def test_full_size_configs_match_the_official_diffusers_configs(family):
    config = diffusers_transformer_config(family_config(family)["network_config"]["params"])
    assert config["attention_head_dim"] == 64 and config["text_embed_dim"] == 4096 and config["time_embed_dim"] == 512
    assert config["norm_eps"] == 1e-5
    assert {key: config[key] for key in OFFICIAL[family]} == OFFICIAL[family]
    assert diffusers_transformer_config(network_config_from_diffusers(config)["params"]) == config


def test_full_size_weights_fit_the_full_size_diffusers_model(family):
    """On the meta device: every converted key and shape, e.g. the 5B-I2V learnable table [1, 226 + 13*30*45, 3072]."""
    network_config = family_config(family, device="meta")["network_config"]
    weights = instantiate_from_config(network_config).state_dict()
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**diffusers_transformer_config(network_config["params"]))
    converted = sat_to_diffusers_transformer(weights, network_config["params"]["num_layers"])
    expected = model.state_dict()
    assert set(converted) == set(expected)
    assert [key for key in expected if converted[key].shape != expected[key].shape] == []


def test_sat_to_diffusers_outputs_match(family):
    network = random_network(family)
    config = diffusers_transformer_config(parity_network_config(family)["params"])
    model = CogVideoXTransformer3DModel(**config).eval()
    model.load_state_dict(sat_to_diffusers_transformer(network.state_dict(), num_layers=2), strict=True)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        expected = network(**inputs)  # 1.5-I2V: satvideo's default ofs 2.0, as the diffusers pipeline passes
    assert relative_error(diffusers_output(model, inputs), expected) <= 1e-5

    # The one remaining difference is the eps of the final adaptive norm (SAT 1e-6, diffusers norm_eps):
    # with it aligned, every other operation agrees to rounding.
    layer = network.transformer.layers[0]
    assert layer.input_layernorm.eps == layer.post_attention_layernorm.eps == config["norm_eps"]
    assert network.transformer.final_layernorm.eps == config["norm_eps"]
    model.norm_out.norm.eps = network.mixins.final_layer.norm_final.eps
    assert relative_error(diffusers_output(model, inputs), expected) <= 1e-6


def test_sincos_positions_match_at_another_latent_size():
    """2B at a grid other than sample_width/height/frames: diffusers recomputes its table, satvideo too."""
    network = random_network("2b")
    model = CogVideoXTransformer3DModel(**diffusers_transformer_config(parity_network_config("2b")["params"]))
    model.load_state_dict(sat_to_diffusers_transformer(network.state_dict(), num_layers=2))
    inputs = tiny_inputs("2b")
    inputs["x"] = torch.randn(2, 5, 16, 12, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network(**inputs)
    assert relative_error(diffusers_output(model.eval(), inputs), expected) <= 1e-5


def test_diffusers_to_sat_outputs_match_and_round_trip_exactly(family):
    config = diffusers_transformer_config(parity_network_config(family)["params"])
    model = random_diffusers_model(config)
    sat_weights = diffusers_to_sat_transformer(model.state_dict())
    network_config = network_config_from_diffusers(config)
    if family.startswith("1.5"):  # diffusers' 1.5 patch Linear always has a bias, here a random one
        network_config["params"]["modules"]["patch_embed_config"]["params"]["bias"] = True
    network = instantiate_from_config(network_config).eval()
    network.load_state_dict(sat_weights, strict=True)
    inputs = tiny_inputs(family)
    model.norm_out.norm.eps = network.mixins.final_layer.norm_final.eps
    with torch.no_grad():
        assert relative_error(network(**inputs), diffusers_output(model, inputs)) <= 1e-6
    assert_equal_state_dicts(sat_to_diffusers_transformer(sat_weights, num_layers=2), model.state_dict())


def test_sat_to_diffusers_to_sat_is_exact(family):
    weights = random_network(family, num_layers=3).state_dict()
    assert_equal_state_dicts(diffusers_to_sat_transformer(sat_to_diffusers_transformer(weights, num_layers=3)), weights)


def test_a_1_5_model_without_patch_bias_gets_a_zero_one_in_diffusers():
    config = parity_network_config("1.5_5b")
    config["params"]["modules"]["patch_embed_config"]["params"]["bias"] = False
    weights = instantiate_from_config(config).state_dict()
    converted = sat_to_diffusers_transformer(weights, num_layers=2)
    assert "mixins.patch_embed.proj.bias" not in weights
    assert torch.equal(converted["patch_embed.proj.bias"], torch.zeros(64))


def test_conversion_errors_name_the_problem():
    params = parity_network_config("5b")["params"]
    with pytest.raises(ValueError, match="no counterpart for: use_SwiGLU"):
        diffusers_transformer_config({**params, "use_SwiGLU": True})
    weights = instantiate_from_config(parity_network_config("5b", lora_rank=4)).state_dict()
    with pytest.raises(ValueError, match="lora-to-diffusers"):
        sat_to_diffusers_transformer(weights, num_layers=2)
    with pytest.raises(ValueError, match=r"expected layers 0..2, the state dict has layers \[0, 1\]"):
        sat_to_diffusers_transformer(random_network("5b").state_dict(), num_layers=3)


def test_diffusers_folder_of_a_1_5_model_keeps_its_patch_bias(tmp_path):
    """diffusers' 1.5 patch Linear always has a bias, as the official SAT 1.5 configs do."""
    config = diffusers_transformer_config(parity_network_config("1.5_5b")["params"])
    assert config["patch_bias"] is False  # the official 1.5 value; it only affects diffusers' Conv2d patches
    model = random_diffusers_model(config)
    write_diffusers_folders([(tmp_path / "transformer", "CogVideoXTransformer3DModel", config, model.state_dict())])
    diffusers_to_sat_checkpoint(tmp_path / "transformer", tmp_path / "sat")
    network_config = load_config([tmp_path / "sat" / "model.yaml"]).model.network_config
    assert "bias" not in network_config.params.modules.patch_embed_config.params
    network = instantiate_from_config(network_config).eval()
    load_network(network, tmp_path / "sat" / "transformer")
    torch.testing.assert_close(network.mixins.patch_embed.proj.bias, model.patch_embed.proj.bias, rtol=0, atol=0)
    inputs = tiny_inputs("1.5_5b")
    model.norm_out.norm.eps = network.mixins.final_layer.norm_final.eps
    with torch.no_grad():
        assert relative_error(network(**inputs), diffusers_output(model, inputs)) <= 1e-6


def test_cli_converts_both_ways(tmp_path):
    """Tiny 2B (sin-cos table recomputed by diffusers after from_pretrained) and the tiny VAE, through the script."""
    network_config = parity_network_config("2b")
    network = random_network("2b")
    weights = network.state_dict()
    # Official 2B checkpoints also store the fixed sin-cos table.
    weights["mixins.pos_embed.pos_embedding"] = torch.zeros(1, 8 + 3 * 4 * 4, 64)
    write_sat_checkpoint(tmp_path / "sat", weights)
    OmegaConf.save(OmegaConf.create({"model": {"network_config": network_config}}), tmp_path / "model.yaml")
    vae_yaml = os.path.join(ROOT, "configs", "tiny", "vae.yaml")
    vae = randomize(instantiate_from_config(to_plain(load_config([vae_yaml]).model.first_stage_config)), seed=2)
    torch.save({"state_dict": vae.state_dict()}, tmp_path / "3d-vae.pt")

    run_cli("sat-to-diffusers", "--config", str(tmp_path / "model.yaml"), vae_yaml, "--checkpoint",
            str(tmp_path / "sat"), "--out", str(tmp_path / "transformer"), "--vae", str(tmp_path / "3d-vae.pt"),
            "--vae-out", str(tmp_path / "vae"))
    model = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    inputs = tiny_inputs("2b")
    with torch.no_grad():
        expected = network(**inputs)
    assert relative_error(diffusers_output(model, inputs), expected) <= 1e-5
    diffusers_vae = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae")
    assert_equal_state_dicts(diffusers_vae.state_dict(), sat_vae_to_diffusers(vae.state_dict()))
    vae_file = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert {value.dtype for value in vae_file.values()} == {torch.float32}

    run_cli("diffusers-to-sat", "--transformer", str(tmp_path / "transformer"), "--out", str(tmp_path / "back"),
            "--vae", str(tmp_path / "vae"))
    rebuilt = instantiate_from_config(load_config([tmp_path / "back" / "model.yaml"]).model.network_config).eval()
    load_network(rebuilt, tmp_path / "back" / "transformer")
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs), expected)
    vae_back = torch.load(tmp_path / "back" / "vae" / "3d-vae.pt", weights_only=True)["state_dict"]
    assert_equal_state_dicts(vae_back, vae.state_dict())


def write_sat_run(folder, family: str) -> None:
    """A tiny random SAT checkpoint of `family` in `folder`/sat and its model config in `folder`/<family>.yaml."""
    write_sat_checkpoint(folder / "sat", random_network(family).state_dict())
    network_config = parity_network_config(family)
    OmegaConf.save(OmegaConf.create({"model": {"network_config": network_config}}), folder / f"{family}.yaml")


def test_cli_checks_the_weights_against_the_config_before_writing(tmp_path):
    write_sat_run(tmp_path, "5b")
    write_sat_run(tmp_path / "other", "1.5_5b")
    message = run_cli("sat-to-diffusers", "--config", str(tmp_path / "other" / "1.5_5b.yaml"), "--checkpoint",
                      str(tmp_path / "sat"), "--out", str(tmp_path / "out"), expect_error=True)
    assert message.startswith(f"error: {tmp_path / 'sat'} does not fit model.network_config: shapes differ, "
                              "checkpoint vs model (3): mixins.patch_embed.proj.weight (64, 16, 2, 2) vs (64, 128)")
    assert not (tmp_path / "out").exists()
    message = script_error("convert_weights.py", "sat-to-diffusers", "--config", str(tmp_path / "5b.yaml"),
                           "--checkpoint", str(tmp_path / "sat"), "--out", str(tmp_path / "out"), "--vae",
                           str(tmp_path / "sat" / "1" / "mp_rank_00_model_states.pt"), "--vae-out", str(tmp_path / "vae"))
    assert message == f"no model.first_stage_config in {tmp_path / '5b.yaml'}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "vae").exists()


def test_cli_drops_a_stored_table_only_where_the_model_recomputes_it(tmp_path):
    """A 2B checkpoint's sin-cos table is recomputed (test_cli_converts_both_ways); a table in a 5B (rotary)
    checkpoint is a weight the model does not have, named as loading it would name it."""
    weights = random_network("5b").state_dict()
    weights["mixins.pos_embed.pos_embedding"] = torch.zeros(1, 8 + 3 * 4 * 4, 64)
    write_sat_checkpoint(tmp_path / "sat", weights)
    OmegaConf.save(OmegaConf.create({"model": {"network_config": parity_network_config("5b")}}), tmp_path / "5b.yaml")
    message = script_error("convert_weights.py", "sat-to-diffusers", "--config", str(tmp_path / "5b.yaml"),
                           "--checkpoint", str(tmp_path / "sat"), "--out", str(tmp_path / "out"))
    assert message == (f"{tmp_path / 'sat'} does not fit model.network_config: unexpected keys (1): "
                       "mixins.pos_embed.pos_embedding")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_replace_an_output_unless_told(tmp_path):
    write_sat_run(tmp_path, "5b")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    command = ("sat-to-diffusers", "--config", str(tmp_path / "5b.yaml"), "--checkpoint", str(tmp_path / "sat"),
               "--out", str(tmp_path / "out"))
    assert script_error("convert_weights.py", *command) == (
        f"--out {tmp_path / 'out'} exists and is not empty; choose another folder or pass --overwrite")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    run_cli(*command, "--overwrite")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json", WEIGHTS_NAME]
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
    message = script_error("convert_weights.py", "diffusers-to-sat", "--transformer", str(tmp_path / "out"), "--out",
                           str(tmp_path / "sat"))
    assert message.startswith(f"--out {tmp_path / 'sat'} exists and is not empty")
    # an output folder is replaced whole: it may hold neither the other output nor an input
    nested = script_error("convert_weights.py", *command[:-1], str(tmp_path / "x" / "transformer"), "--vae",
                          str(tmp_path / "sat" / "1" / "mp_rank_00_model_states.pt"), "--vae-out", str(tmp_path / "x"))
    assert nested == (f"--out {tmp_path / 'x' / 'transformer'} lies in --vae-out {tmp_path / 'x'}, which is written "
                      "whole; give folders apart")
    holding_input = script_error("convert_weights.py", *command[:-1], str(tmp_path), "--overwrite")
    assert holding_input == f"--checkpoint {tmp_path / 'sat'} lies in --out {tmp_path}, which is written whole; give " \
                            "folders apart"
    assert (tmp_path / "sat" / "latest").is_file() and not (tmp_path / "x").exists()
    assert script_error("convert_weights.py", "lora-to-diffusers", "--checkpoint", str(tmp_path / "sat"), "--out",
                        str(tmp_path / "5b.yaml")) == f"--out {tmp_path / '5b.yaml'} is a file; give a folder"


def test_cli_names_the_diffusers_input_it_cannot_use(tmp_path):
    vae = tmp_path / "vae"
    write_diffusers_folders([(vae, "AutoencoderKLCogVideoX", {}, {"encoder.conv_in.weight": torch.zeros(2)})])
    out = str(tmp_path / "sat")
    assert run_cli("diffusers-to-sat", "--transformer", str(vae), "--out", out, expect_error=True) == \
        f"error: {vae} holds a AutoencoderKLCogVideoX, not a CogVideoXTransformer3DModel"

    config = diffusers_transformer_config(parity_network_config("5b")["params"])
    model = random_diffusers_model(config)
    transformer = tmp_path / "transformer"
    write_diffusers_folders([(transformer, "CogVideoXTransformer3DModel", {**config, "num_layers": 3},
                              model.state_dict())])
    message = script_error("convert_weights.py", "diffusers-to-sat", "--transformer", str(transformer), "--out", out)
    assert message.startswith(f"{transformer} does not fit its own config.json: missing keys (")
    assert "transformer.layers.2.attention.query_key_value.weight" in message

    write_diffusers_folders([(transformer, "CogVideoXTransformer3DModel", {**config, "num_layers": "two"},
                              model.state_dict())])
    message = script_error("convert_weights.py", "diffusers-to-sat", "--transformer", str(transformer), "--out", out)
    assert message == f"{transformer}: diffusers config num_layers='two': expected a whole number >= 1"
    (transformer / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    message = script_error("convert_weights.py", "diffusers-to-sat", "--transformer", str(transformer), "--out", out)
    assert message.startswith(f"{transformer / WEIGHTS_NAME} is not a readable safetensors file (")
    (transformer / "config.json").write_text("{num_layers: 2")
    message = script_error("convert_weights.py", "diffusers-to-sat", "--transformer", str(transformer), "--out", out)
    assert message.startswith(f"{transformer / 'config.json'} is not readable JSON (")
    assert not (tmp_path / "sat").exists()


def test_folders_written_together_appear_together_or_not_at_all(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):  # the second folder cannot be made: the first does not appear either
        write_diffusers_folders([(tmp_path / "transformer", "CogVideoXTransformer3DModel", {}, {"w": torch.zeros(2)}),
                                 (tmp_path / "file" / "vae", "AutoencoderKLCogVideoX", {}, {"w": torch.zeros(2)})])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_a_folder_replaced_atomically_is_whole_or_untouched(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with folder_replaced_atomically(target) as partial:
            (partial / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with folder_replaced_atomically(target) as partial:
        (partial / "first.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with folder_replaced_atomically(target) as partial:
            (partial / "second.txt").write_text("2")
            raise RuntimeError("killed")
    assert [path.name for path in target.iterdir()] == ["first.txt"]
    with folder_replaced_atomically(target) as partial:
        (partial / "second.txt").write_text("2")
    assert [path.name for path in target.iterdir()] == ["second.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
