"""SAT LoRA adapters exported for diffusers: a trained adapter gives the same outputs after
`CogVideoXPipeline.load_lora_weights` on the converted base weights."""

import pytest
import torch
from conftest import tiny_inputs
from convert_helpers import (diffusers_output, parity_network_config, randomize, relative_error, run_cli,
                             write_sat_checkpoint)
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors.torch import save_file

from satvideo.config import instantiate_from_config
from satvideo.convert.lora import sat_lora_to_peft
from satvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer


def base_and_lora_networks(family: str, num_layers: int, lora_alpha: float):
    """A random base network and a rank-4 LoRA network starting from the same weights."""
    base = randomize(instantiate_from_config(parity_network_config(family, num_layers)), seed=0)
    config = parity_network_config(family, num_layers, lora_rank=4)
    config["params"]["modules"]["lora_config"]["params"]["lora_alpha"] = lora_alpha
    network = instantiate_from_config(config)
    network.load_state_dict(base.state_dict(), strict=False)  # SAT's LoRA layers read the plain Linear weights
    return base, network


def train_lora(network, inputs: dict, steps: int = 5) -> None:
    """A few Adam steps of the LoRA matrices only, towards a random target."""
    lora = [p for name, p in network.named_parameters() if "matrix_" in name]
    for parameter in network.parameters():
        parameter.requires_grad_(any(parameter is p for p in lora))
    optimizer = torch.optim.Adam(lora, lr=0.02)
    target = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(5))
    network.train()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(network(**inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()


def diffusers_pipeline(family: str, num_layers: int, base_weights: dict) -> CogVideoXPipeline:
    """A pipeline around the converted base transformer; no text encoder or VAE is needed to load LoRA weights."""
    config = diffusers_transformer_config(parity_network_config(family, num_layers)["params"])
    transformer = CogVideoXTransformer3DModel(**config)
    transformer.load_state_dict(sat_to_diffusers_transformer(base_weights, num_layers), strict=True)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer.eval(),
                             scheduler=CogVideoXDDIMScheduler())


@pytest.mark.parametrize("family, num_layers, lora_alpha", [("5b", 3, 1.0), ("1.5_5b_i2v", 2, 8.0)])
def test_trained_lora_matches_after_load_lora_weights(tmp_path, family, num_layers, lora_alpha):
    base, network = base_and_lora_networks(family, num_layers, lora_alpha)
    inputs = tiny_inputs(family)
    train_lora(network, inputs)
    with torch.no_grad():
        base_output, expected = base(**inputs), network(**inputs)
    assert relative_error(expected, base_output) > 1e-3  # the adapter changes the output well beyond tolerance

    peft = sat_lora_to_peft(network.state_dict(), lora_alpha)
    assert len(peft) == num_layers * 4 * 2  # q, k, v, out; A and B
    save_file(peft, tmp_path / "pytorch_lora_weights.safetensors")
    pipeline = diffusers_pipeline(family, num_layers, base.state_dict())
    pipeline.load_lora_weights(tmp_path)
    assert relative_error(diffusers_output(pipeline.transformer, inputs), expected) <= 1e-5


def test_cli_exports_a_sat_lora_checkpoint(tmp_path):
    """A SAT LoRA checkpoint (base weights under `.original`, alpha 8) through scripts/convert_weights.py."""
    _, network = base_and_lora_networks("2b", num_layers=2, lora_alpha=8.0)
    randomize(network, seed=3)
    weights = network.state_dict()
    write_sat_checkpoint(tmp_path / "sat", weights)
    run_cli("lora-to-diffusers", "--checkpoint", str(tmp_path / "sat"), "--out", str(tmp_path / "lora"),
            "--lora-alpha", "8")

    base_weights = {key.replace(".original.", "."): value for key, value in weights.items() if "matrix_" not in key}
    pipeline = diffusers_pipeline("2b", 2, base_weights)
    pipeline.load_lora_weights(tmp_path / "lora")
    inputs = tiny_inputs("2b")
    with torch.no_grad():
        expected = network(**inputs)
    assert relative_error(diffusers_output(pipeline.transformer, inputs), expected) <= 1e-5

    exported = (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    again = ("lora-to-diffusers", "--checkpoint", str(tmp_path / "sat"), "--out", str(tmp_path / "lora"))
    assert run_cli(*again, expect_error=True) == (
        f"error: --out {tmp_path / 'lora'} holds pytorch_lora_weights.safetensors already; choose another folder or "
        "pass --overwrite")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == exported
    assert run_cli(*again, "--overwrite", "--lora-alpha", "0", expect_error=True) == \
        "error: --lora-alpha 0.0: expected a number > 0"
    base_only = tmp_path / "base"
    write_sat_checkpoint(base_only, base_weights)
    message = run_cli("lora-to-diffusers", "--checkpoint", str(base_only), "--out", str(tmp_path / "none"),
                      expect_error=True)
    assert message.startswith(f"error: {base_only / '1' / 'mp_rank_00_model_states.pt'}: no LoRA matrices")
    assert not (tmp_path / "none").exists()


def test_malformed_lora_records_and_matrices_are_one_line(tmp_path):
    from satvideo.config import CheckpointError
    from satvideo.convert.checkpoints import sat_lora_to_diffusers_checkpoint

    pair = {"transformer.layers.0.attention.dense.matrix_A.0": torch.ones(2, 8),
            "transformer.layers.0.attention.dense.matrix_B.0": torch.ones(8, 2)}
    for record, shown in (({"lora_alpha": "big"}, "'big'"), ("x", "None"), ({"lora_alpha": -3}, "-3")):
        path = tmp_path / "alpha.pt"
        torch.save({"module": pair, "lora": record}, path)
        with pytest.raises(CheckpointError, match=rf"^{path}: its recorded LoRA alpha \({shown} in .*\) is not a number > "
                                                  r"0; give the run's alpha with --lora-alpha$"):
            sat_lora_to_diffusers_checkpoint(path, tmp_path / "out")
    flat = tmp_path / "flat.pt"
    torch.save({"module": {**pair, "transformer.layers.0.attention.dense.matrix_B.0": torch.ones(8)}}, flat)
    with pytest.raises(CheckpointError, match=r"matrix_B.0: a LoRA matrix is 2-D \(\[out, r\]\), found shape \[8\]$"):
        sat_lora_to_diffusers_checkpoint(flat, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_state_dict_without_lora_is_an_error():
    weights = instantiate_from_config(parity_network_config("5b")).state_dict()
    with pytest.raises(ValueError, match="no LoRA matrices"):
        sat_lora_to_peft(weights)
