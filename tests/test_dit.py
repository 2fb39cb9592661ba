"""The diffusion transformer: full-size builds, official key layout, and the behaviour of each mixin."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, family_config, tiny_inputs, tiny_network_config

from satvideo.config import ConfigError, instantiate_from_config
from satvideo.dit.positions import apply_rotary, rotary_frequencies, sincos_3d


MASK = torch.ones(1, 1)  # SAT's "full attention" mask placeholder


def build(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return instantiate_from_config(config)


def count_without_position_tables(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "pos_embedding" not in name)


@pytest.mark.parametrize("family, expected", [("2b", 1_693_783_872), ("5b", 5_570_283_072)])
def test_full_size_parameter_count(family, expected):
    network = family_config(family, device="meta")["network_config"]
    assert count_without_position_tables(instantiate_from_config(network)) == expected


def test_every_full_size_config_builds_on_meta(family):
    model = instantiate_from_config(family_config(family, device="meta")["network_config"])
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_without_position_tables(model) > (1_600_000_000 if family == "2b" else 5_500_000_000)


def test_lora_overlay_applies_to_every_family(family):
    """configs/lora.yaml on top of a family config: adapters on every layer, only they are trainable."""
    from satvideo.config import load_config, to_plain
    from satvideo.engine import trainable_filter

    merged = to_plain(load_config([FAMILIES[family], "configs/lora.yaml"]).model)
    lora = merged["network_config"]["params"]["modules"]["lora_config"]
    assert lora["target"] == "sat.model.finetune.lora2.LoraMixin" and merged["not_trainable_prefixes"] == ["all"]
    model = build(tiny_network_config(family, lora_rank=4))
    is_trainable = trainable_filter(merged["not_trainable_prefixes"])
    trainable = {name for name, _ in model.named_parameters() if is_trainable(name)}
    assert len(trainable) == 2 * (3 + 3 + 1 + 1)  # qkv A/B (3 each) and dense A/B (1 each), per layer
    assert all("matrix_" in name for name in trainable)


def official_keys(family: str, num_layers: int = 2) -> set[str]:
    """Keys of an official SAT transformer checkpoint (prefix model.diffusion_model. removed), per keymap.md."""
    keys = set()
    weight_bias = ("weight", "bias")
    for i in range(num_layers):
        for part in ("input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            keys |= {f"transformer.layers.{i}.{part}.{w}" for w in weight_bias}
        keys |= {f"mixins.adaln_layer.adaLN_modulations.{i}.1.{w}" for w in weight_bias}
        keys |= {f"mixins.adaln_layer.{norm}.{i}.{w}" for norm in ("query_layernorm_list", "key_layernorm_list")
                 for w in weight_bias}
    for part in ("transformer.final_layernorm", "time_embed.0", "time_embed.2", "mixins.patch_embed.text_proj",
                 "mixins.final_layer.norm_final", "mixins.final_layer.adaLN_modulation.1", "mixins.final_layer.linear"):
        keys |= {f"{part}.{w}" for w in weight_bias}
    keys |= {"mixins.patch_embed.proj.weight", "mixins.patch_embed.proj.bias"}
    if family == "5b_i2v":
        keys.add("mixins.pos_embed.pos_embedding")
    if family == "1.5_5b_i2v":
        keys |= {f"ofs_embed.{i}.{w}" for i in (0, 2) for w in weight_bias}
    return keys


def test_state_dict_keys_match_the_official_layout(family):
    model = build(tiny_network_config(family))
    assert set(model.state_dict()) == official_keys(family)


def test_patch_projection_shapes_follow_the_official_checkpoints():
    conv = build(tiny_network_config("5b")).state_dict()["mixins.patch_embed.proj.weight"]
    linear = build(tiny_network_config("1.5_5b")).state_dict()["mixins.patch_embed.proj.weight"]
    assert conv.shape == (64, 16, 2, 2)  # Conv2d per frame (1.0)
    assert linear.shape == (64, 16 * 2 * 2 * 2)  # Linear over (c, t, h, w) patches (1.5)


def test_output_shape_and_lora_keys(family):
    model = build(tiny_network_config(family, lora_rank=4))
    inputs = tiny_inputs(family)
    assert model(**inputs).shape == inputs["x"].shape
    keys = set(model.state_dict())
    for i in range(2):
        assert {f"transformer.layers.{i}.attention.query_key_value.matrix_A.{j}" for j in range(3)} <= keys
        assert f"transformer.layers.{i}.attention.dense.matrix_B.0" in keys


def test_lora_starts_as_the_base_model_and_changes_it_once_trained():
    base = build(tiny_network_config("5b"))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    lora = build(tiny_network_config("5b", lora_rank=4))
    lora.load_state_dict(base.state_dict(), strict=False)  # LoRA's linears accept the base keys
    inputs = tiny_inputs("5b")
    torch.testing.assert_close(lora(**inputs), base(**inputs), rtol=0, atol=0)
    with torch.no_grad():
        lora.transformer.layers[0].attention.dense.matrix_B[0].normal_(0, 1.0)
    assert (lora(**inputs) - base(**inputs)).abs().max() > 1e-5  # exactly 0 if the adapter were bypassed


def test_adaln_zero_init_makes_every_block_the_identity():
    model = build(tiny_network_config("5b"))
    hidden = torch.randn(2, 8 + 12, 64)
    out = model.mixins.adaln_layer.layer_forward(hidden, MASK, layer_id=0, text_length=8, emb=torch.randn(2, 32),
                                                 grid_size=(3, 2, 2))
    torch.testing.assert_close(out, hidden, rtol=0, atol=0)


def test_text_and_video_tokens_get_their_own_modulation():
    """Changing only the text half of the 12-way modulation leaves video-only paths unchanged at layer output."""
    model = build(tiny_network_config("5b", num_layers=1))
    adaln = model.mixins.adaln_layer.adaLN_modulations[0][1]
    with torch.no_grad():
        adaln.weight.normal_(0, 0.1)
        adaln.bias.normal_(0, 0.1)
    layer = model.mixins.adaln_layer.layer_forward
    hidden, emb = torch.randn(1, 8 + 12, 64), torch.randn(1, 32)
    kwargs = dict(layer_id=0, text_length=8, emb=emb, grid_size=(3, 2, 2))
    before = layer(hidden, MASK, **kwargs)
    with torch.no_grad():  # rows 6*64.. are the text chunks; zero the text gates (chunks 8 and 11)
        adaln.bias[8 * 64:9 * 64] = 0
        adaln.weight[8 * 64:9 * 64] = 0
        adaln.bias[11 * 64:12 * 64] = 0
        adaln.weight[11 * 64:12 * 64] = 0
    after = layer(hidden, MASK, **kwargs)
    torch.testing.assert_close(after[:, :8], hidden[:, :8])  # text gates closed: text tokens pass through
    assert (after[:, 8:] - hidden[:, 8:]).abs().max() > 1e-3  # video tokens still updated
    assert (before[:, :8] - hidden[:, :8]).abs().max() > 1e-3


def reference_sincos_3d(dim, t, h, w, interp_t=1.0, interp_h=1.0, interp_w=1.0):
    """The published numpy recipe: meshgrid with width first, sin then cos, time channels first."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    spatial_dim = dim // 4 * 3
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32) / interp_w, np.arange(h, dtype=np.float32) / interp_h), 0)
    spatial = np.concatenate([one_d(spatial_dim // 2, grid[0]), one_d(spatial_dim // 2, grid[1])], axis=1)
    temporal = one_d(dim // 4, np.arange(t, dtype=np.float32) / interp_t)
    table = np.concatenate([np.repeat(temporal[:, None], h * w, 1), np.repeat(spatial[None], t, 0)], axis=-1)
    return table.reshape(-1, dim)


def test_sincos_table_matches_the_reference_recipe():
    ours = sincos_3d(64, (3, 4, 5), (1.0, 1.875, 1.875))
    expected = reference_sincos_3d(64, 3, 4, 5, 1.0, 1.875, 1.875)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)


def test_sincos_positions_are_added_to_video_tokens_only():
    model = build(tiny_network_config("2b"))
    images = torch.zeros(1, 3, 16, 8, 8)
    table = model.mixins.pos_embed.position_embedding_forward(None, images=images, text_length=8, grid_size=(3, 4, 4))
    assert table.shape == (1, 8 + 48, 64)
    assert table[0, :8].abs().max() == 0 and table[0, 8:].abs().min() >= 0 and table[0, 8:].abs().max() > 0.5


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, grid = 16, (3, 4, 5)
    angles = rotary_frequencies(head_dim, grid)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    n = angles.shape[0]
    rotated_q = apply_rotary(q.expand(1, 1, n, head_dim), angles.cos(), angles.sin())[0, 0]
    rotated_k = apply_rotary(k.expand(1, 1, n, head_dim), angles.cos(), angles.sin())[0, 0]
    scores = (rotated_q @ rotated_k.T).reshape(*grid, *grid)
    torch.testing.assert_close(rotated_q.norm(dim=-1), q.norm().expand(n))  # rotations keep norms
    # shifting both positions by the same (dt, dh, dw) keeps the score
    torch.testing.assert_close(scores[0, 0, 0, 1, 2, 3], scores[1, 1, 1, 2, 3, 4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[1, 2, 0, 0, 1, 2], scores[2, 3, 2, 1, 2, 4], rtol=1e-5, atol=1e-5)
    assert (scores[0, 0, 0, 1, 2, 3] - scores[0, 0, 0, 2, 2, 3]).abs() > 1e-4  # but not absolute-invariant


def test_rotary_channel_split_is_two_three_three():
    angles = rotary_frequencies(64, (2, 3, 4)).reshape(2, 3, 4, 64)
    assert torch.equal(angles[0, :, :, :16], torch.zeros(3, 4, 16))  # time channels vanish at t=0
    assert angles[1, 0, 0, :16].abs().min() > 0 and angles[1, 0, 0, 16:].abs().max() == 0
    assert angles[0, 1, 0, 16:40].abs().min() > 0 and angles[0, 1, 0, 40:].abs().max() == 0


def test_attention_goes_through_scaled_dot_product_attention(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = build(tiny_network_config("5b"))
    model(**tiny_inputs("5b"))
    assert calls == [torch.Size([2, 4, 8 + 3 * 4 * 4, 16])] * 2  # [B, heads, text + video tokens, head_dim]


def test_activation_checkpointing_gives_the_same_values_and_gradients():
    results = []
    for checkpointing in (False, True):
        config = tiny_network_config("5b")
        config["params"]["checkpoint_activations"] = checkpointing
        model = build(config).train()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        out = model(**tiny_inputs("5b"))
        out.square().mean().backward()
        results.append((out.detach(), model.transformer.layers[0].attention.dense.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_swiglu_and_rmsnorm_options():
    config = tiny_network_config("5b")
    config["params"].update(use_SwiGLU=True, use_RMSNorm=True)
    model = build(config)
    keys = set(model.state_dict())
    assert {"mixins.swiglu.w2.0.weight", "mixins.swiglu.w2.1.weight"} <= keys
    assert "transformer.layers.0.input_layernorm.bias" not in keys  # RMSNorm has a scale only
    inputs = tiny_inputs("5b")
    assert model(**inputs).shape == inputs["x"].shape


def test_bad_shapes_and_missing_mixins_are_reported():
    model = build(tiny_network_config("1.5_5b"))
    inputs = tiny_inputs("1.5_5b")
    inputs["x"] = inputs["x"][:, :3]  # 3 latent frames cannot be cut into temporal patches of 2
    with pytest.raises(ValueError, match=r"latent shape \(2, 3, 16, 8, 8\) is not divisible by the patch size \(2, 2, 2\)"):
        model(**inputs)
    config = tiny_network_config("5b")
    del config["params"]["modules"]["final_layer_config"]
    with pytest.raises(ConfigError, match="modules.final_layer_config is missing"):
        instantiate_from_config(config)


def test_head_sizes_that_do_not_fit_the_width_are_refused_when_the_network_is_built():
    config = tiny_network_config("5b")
    config["params"]["num_attention_heads"] = 3
    with pytest.raises(ConfigError, match=r"^model.network_config.params.hidden_size=64 is not a multiple of "
                                          r"num_attention_heads=3$"):
        instantiate_from_config(config)
    config = tiny_network_config("5b")
    config["params"]["modules"]["pos_embed_config"]["params"]["hidden_size_head"] = 32
    with pytest.raises(ConfigError, match=r"hidden_size_head=32: the heads are 16 wide \(hidden_size 64 / "
                                          r"num_attention_heads 4\)$"):
        instantiate_from_config(config)


def test_learnable_position_table_refuses_another_grid():
    model = build(tiny_network_config("5b_i2v"))
    inputs = tiny_inputs("5b_i2v")
    assert model(**inputs).shape == inputs["x"].shape  # the configured 3 x 4 x 4 patches
    inputs = {key: value[..., :4, :4] if value.ndim == 5 else value for key, value in inputs.items()}
    with pytest.raises(ValueError, match=r"learnable position table covers 3 x 4 x 4 .* this input has 3 x 2 x 2"):
        model(**inputs)
