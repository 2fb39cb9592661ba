"""Given the official YAMLs, satvideo does what the original CogVideoX SAT code does.

Expected values are computed by hand from the original's formulas (SwissArmyTransformer's AnnealingLR and
get_params_for_weight_decay_optimization, CogVideo's engine and sample_video.py); frame choice is in
test_data.py and timestep stratification in test_diffusion.py.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_network_config
from safetensors.torch import load_file
from test_official_configs import TINY_PARTS, official
from test_training import ROOT, run

from satvideo.config import ConfigError, args_namespace, instantiate_from_config, load_config, to_plain
from satvideo.data.toy import make_toy_dataset
from satvideo.data.video import read_mp4
from satvideo.engine import VideoDiffusionEngine, trainable_filter
from satvideo.sampling import latent_frame_count, size_from_image
from satvideo.checkpoint import MODEL_STATES, write_latest
from satvideo.training.deepspeed_setup import deepspeed_config
from satvideo.training.loop import schedule_from_args
from satvideo.training.lr_schedule import weight_decay_groups

TINY = ["configs/tiny/model.yaml", "configs/tiny/vae.yaml"]


# --- learning rate ----------------------------------------------------------------------------------------

def lr_at(config, iteration: int) -> float:
    """The lr of optimizer step `iteration` (1-based), as LambdaLR gives it to step iteration - 1."""
    return config.deepspeed.optimizer.params.lr * schedule_from_args(args_namespace(config))(iteration - 1)


def test_official_sft_schedule_is_sats_finetune_schedule():
    # official sft.yaml: mode finetune, lr 1e-5, SAT defaults linear decay and warmup 0.01 of 1000 -> W = 10
    config = load_config(official("sft.yaml"))
    assert lr_at(config, 1) == pytest.approx(5e-7)  # auto warm-up: min(5%, n / W)
    assert lr_at(config, 10) == pytest.approx(5e-7)  # end of warm-up, still inside the 100 auto warm-up steps
    assert lr_at(config, 100) == pytest.approx(5e-7)
    assert lr_at(config, 101) == pytest.approx(1e-5 * (1000 - (101 - 10)) / 1000)  # 0.909 lr
    assert lr_at(config, 500) == pytest.approx(1e-5 * 0.51)  # middle
    assert lr_at(config, 1000) == pytest.approx(1e-7)  # end: (1000 - 990) / 1000


def test_pretrain_mode_and_cosine_follow_annealing_lr():
    config = load_config(official("sft.yaml"), ["args.mode=pretrain", "args.lr_decay_style=cosine"])
    assert lr_at(config, 1) == pytest.approx(1e-6)  # n / W = 1 / 10
    assert lr_at(config, 10) == pytest.approx(1e-5)  # warm-up end
    # cosine over (n - W) / lr_decay_iters down to lr * lr_decay_ratio (0.1)
    assert lr_at(config, 510) == pytest.approx(1e-5 * (0.1 + 0.9 * 0.5))
    assert lr_at(config, 1000) == pytest.approx(1e-5 * (0.1 + 0.9 * (1 + torch.cos(torch.tensor(0.99 * torch.pi)).item()) / 2))


# --- weight decay, trainable parameters, activation checkpointing ----------------------------------------

def tiny_network(**transformer_args):
    config = tiny_network_config("5b")
    config["params"]["transformer_args"].update(transformer_args)
    torch.manual_seed(0)
    return instantiate_from_config(config)


def test_weight_decay_groups_exempt_norms_and_biases_as_sat():
    network = tiny_network()
    decay, no_decay = weight_decay_groups(network)
    names = {id(parameter): name for name, parameter in network.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    expected_no_decay = {name for name in names.values()
                         if name.endswith(".bias") or "layernorm" in name or "norm_final" in name}
    assert no_decay_names == expected_no_decay
    assert "transformer.layers.0.input_layernorm.weight" in no_decay_names  # LayerNorm weights too
    assert "mixins.adaln_layer.query_layernorm_list.0.weight" in no_decay_names
    assert "transformer.layers.0.attention.query_key_value.weight" in decay_names


def test_frozen_parameters_are_left_out_of_the_groups():
    network = tiny_network()
    for parameter in network.transformer.layers[0].parameters():
        parameter.requires_grad_(False)
    grouped = {id(p) for group in weight_decay_groups(network) for p in group["params"]}
    assert grouped == {id(p) for p in network.parameters() if p.requires_grad}


def test_official_style_prefixes_freeze_exactly_the_named_parameters(caplog):
    for prefix in ("model.diffusion_model.transformer.layers.0", "transformer.layers.0"):
        with caplog.at_level("INFO", logger="satvideo.engine"):
            engine = VideoDiffusionEngine.from_config(to_plain(load_config(TINY).model),
                                                      not_trainable_prefixes=["first_stage_model", prefix])
        frozen = {name for name, p in engine.network.named_parameters() if not p.requires_grad}
        assert frozen == {name for name, _ in engine.network.named_parameters() if name.startswith("transformer.layers.0")}
        counts = [record.getMessage() for record in caplog.records if "network parameters:" in record.getMessage()]
        frozen_count = sum(p.numel() for p in engine.network.parameters() if not p.requires_grad)
        assert f"{frozen_count} frozen" in counts[-1]
    # LoRA matrices are never frozen, whatever the prefixes say (as the original)
    assert trainable_filter(["transformer.layers.0"])("transformer.layers.0.attention.query_key_value.matrix_A.0")


def test_a_prefix_that_matches_nothing_is_an_error_naming_the_closest():
    model = to_plain(load_config(TINY).model)
    with pytest.raises(ConfigError, match=r"model.not_trainable_prefixes: 'model.diffusion_model.transformer.layer.0' "
                                          r"matches no parameter; closest real prefix: "
                                          r"'model.diffusion_model.transformer.layers.0'"):
        VideoDiffusionEngine.from_config(model, not_trainable_prefixes=["model.diffusion_model.transformer.layer.0"])


@pytest.mark.parametrize("from_args, expected", [(None, True), (False, False), (True, True)])
def test_transformer_args_decide_activation_checkpointing_unless_args_say(from_args, expected):
    model = to_plain(load_config(TINY).model)
    model["network_config"]["params"]["transformer_args"] = {"checkpoint_activations": True}
    engine = VideoDiffusionEngine.from_config(model, checkpoint_activations=from_args)
    assert engine.network.transformer.checkpoint_activations is expected
    assert load_config(official("sft.yaml")).args.checkpoint_activations is True
    assert load_config(TINY).args.checkpoint_activations is None  # the default leaves it to the model


# --- unknown keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("args.train_iter=3", r"unknown key args.train_iter; did you mean args.train_iters\?"),
    ("deepspeed.gradient_cliping=1.0", r"unknown key deepspeed.gradient_cliping; did you mean deepspeed.gradient_clipping\?"),
])
def test_misspelt_args_and_deepspeed_keys_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(official("sft.yaml"), [override])


def test_misspelt_model_key_names_the_closest():
    model = to_plain(load_config(TINY).model)
    model["scale_facter"] = 0.7
    with pytest.raises(ConfigError, match=r"unknown key model.scale_facter; did you mean model.scale_factor\?"):
        VideoDiffusionEngine.from_config(model)


def test_misspelt_data_key_names_the_closest(tmp_path):
    config = load_config(official("sft.yaml"), ["data.params.max_num_frame=9"])
    with pytest.raises(ConfigError, match=r"unknown key data_video.SFTDataset params.max_num_frame; "
                                          r"did you mean data_video.SFTDataset params.max_num_frames\?"):
        instantiate_from_config(config.data, data_dir=str(tmp_path))


def test_a_misspelt_params_key_of_any_part_is_an_error():
    config = load_config(official("sft.yaml"))
    data = to_plain(config.data)
    data["parmas"] = data.pop("params")
    with pytest.raises(ConfigError, match=r"unknown key data_video.SFTDataset config.parmas; did you mean .*params\?"):
        instantiate_from_config(data, data_dir="unused")
    model = to_plain(load_config(TINY).model)
    model["conditioner_config"]["params"]["emb_models"][0]["ucg_rat"] = 0.1
    with pytest.raises(ConfigError, match=r"emb_models\[0\].ucg_rat; did you mean .*ucg_rate\?"):
        VideoDiffusionEngine.from_config(model)


@pytest.mark.parametrize("override, message", [
    ("deepspeed.optimizer.type=AdamX", r"deepspeed.optimizer.type='AdamX' is neither .*; did you mean adam\?"),
    ("deepspeed.optimizer.params.weight_decai=0.1",
     r"unknown key deepspeed.optimizer.params.weight_decai; did you mean deepspeed.optimizer.params.weight_decay\?"),
    ("deepspeed.optimizer.type=torch.optim.SGD", r"unknown key deepspeed.optimizer.params.betas"),
])
def test_optimizer_type_and_params_are_checked(override, message):
    config = load_config([*TINY, "configs/sft.yaml"], [override])
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(config, args_namespace(config), on_gpu=False)


@pytest.mark.parametrize("path, key, message", [
    ("modules.adaln_layer_config.params", "qk_lm", r"params.qk_lm; did you mean .*params.qk_ln\?"),
    ("transformer_args", "checkpoint_activation",
     r"transformer_args.checkpoint_activation; did you mean .*transformer_args.checkpoint_activations\?"),
    ("", "num_layer", r"params.num_layer; did you mean .*params.num_layers\?"),
])
def test_misspelt_network_and_mixin_keys_name_the_closest(path, key, message):
    config = tiny_network_config("5b")
    section = config["params"]
    for part in filter(None, path.split(".")):
        section = section.setdefault(part, {})
    section[key] = 1
    with pytest.raises(ConfigError, match=message):
        instantiate_from_config(config)


def test_unknown_section_and_entrypoint_error_is_one_line(tmp_path):
    (tmp_path / "typo.yaml").write_text("modle: {scale_factor: 1.0}\n")
    with pytest.raises(ConfigError, match=r"unknown section 'modle'.*did you mean model\?"):
        load_config([str(tmp_path / "typo.yaml")])
    make_toy_dataset(tmp_path / "data", num=2, size=32, frames=9)
    result = run_failing([sys.executable, "train_video.py", "--base", *TINY, "configs/tiny/train.yaml",
                          "model.network_config.params.modules.adaln_layer_config.params.qk_lm=true",
                          f"args.save={tmp_path / 'run'}", f"args.train_data=[{tmp_path / 'data'}]"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown key") and "qk_ln" in last


def run_failing(command):
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_official_keys_without_effect_are_logged_once(caplog):
    from satvideo import config as config_module

    config_module._logged_ignored.clear()
    with caplog.at_level("INFO", logger="satvideo.config"):
        load_config(official("sft.yaml"))
        load_config(official("sft.yaml"))
    ignored = [record.getMessage() for record in caplog.records if "without effect" in record.getMessage()]
    assert sum("args.only_log_video_latents" in message for message in ignored) == 1
    assert sum("deepspeed.loss_scale:" in message for message in ignored) == 1


# --- sampling: 1.5 frame counts and fps, image-derived size, latents only --------------------------------

def test_1_5_i2v_size_follows_the_image_as_the_original():
    assert size_from_image(1080, 1920) == (768, 1360)  # 1365.3 -> nearest multiple of 16
    assert size_from_image(1920, 1080) == (1360, 768)
    assert size_from_image(512, 512) == (768, 768)
    assert size_from_image(768, 1024) == (768, 1024)


TINY_1_5 = TINY_PARTS


@pytest.mark.slow
def test_1_5_sampling_num_frames_22_gives_81_frames_at_16_fps(tmp_path):
    model = [*official("cogvideox1.5_5b.yaml"), "configs/tiny/vae.yaml"]
    # a random tiny network saved in the SAT layout
    config = load_config(model, TINY_1_5)
    torch.manual_seed(0)
    engine = VideoDiffusionEngine.from_config(config.model)
    (tmp_path / "ckpt" / "1").mkdir(parents=True)
    torch.save({"module": engine.state_dict()}, tmp_path / "ckpt" / "1" / MODEL_STATES)
    write_latest(tmp_path / "ckpt", 1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n")
    common = [sys.executable, "sample_video.py", "--base", *model, *official("inference.yaml"), *TINY_1_5,
              f"args.load={tmp_path / 'ckpt'}", f"args.input_file={prompts}", "args.sampling_image_size=[32,32]",
              "args.bf16=false", "model.sampler_config.params.num_steps=2",
              "model.sampler_config.params.guider_config.params.num_steps=2"]
    run([*common, f"args.output_dir={tmp_path / 'videos'}"])  # official inference.yaml: 22 latent frames, 16 fps
    record = json.loads((tmp_path / "videos" / "manifest.jsonl").read_text())
    frames, fps = read_mp4(tmp_path / "videos" / record["file"])
    assert frames.shape[0] == 81 and round(fps) == 16

    run([*common, f"args.output_dir={tmp_path / 'latents'}", "args.only_save_latents=true"])
    record = json.loads((tmp_path / "latents" / "manifest.jsonl").read_text())
    assert record["file"].endswith(".safetensors") and not list((tmp_path / "latents").glob("*.mp4"))
    latents = load_file(tmp_path / "latents" / record["file"])["latents"]
    assert latents.shape == (16, 21, 4, 4)  # [C, T', h, w]: the 21 latent frames that decode to 81


def test_bad_sampling_num_frames_are_refused():
    from types import SimpleNamespace

    one_five = SimpleNamespace(patch_size=[2, 2, 2], num_frames=81, time_compressed_rate=4)
    assert latent_frame_count(SimpleNamespace(sampling_num_frames=None), one_five) == 21
    assert latent_frame_count(SimpleNamespace(sampling_num_frames=42), one_five) == 41
    with pytest.raises(ConfigError, match=r"args.sampling_num_frames=21: 1.5 models sample a multiple of 2"):
        latent_frame_count(SimpleNamespace(sampling_num_frames=21), one_five)
    one = SimpleNamespace(patch_size=2, num_frames=49, time_compressed_rate=4)
    assert latent_frame_count(SimpleNamespace(sampling_num_frames=13), one) == 13
    with pytest.raises(ConfigError, match=r"^args.sampling_num_frames=0: expected a whole number >= 1 \(or null\)$"):
        load_config([], ["args.sampling_num_frames=0"])  # refused when the config loads


@pytest.mark.parametrize("family", ["cogvideox_5b.yaml", "cogvideox1.5_5b.yaml"])
def test_the_project_sft_config_trains_with_the_official_batch_and_timestep_groups(family):
    def setup(files: list[str]) -> tuple[int, dict]:
        config = load_config(files, ["args.train_data=[data/sft]"])
        ds = deepspeed_config(config, args_namespace(config), on_gpu=False)
        sampler = to_plain(config.model.loss_fn_config.params.sigma_sampler_config.params)
        return ds["train_micro_batch_size_per_gpu"], {key: sampler.get(key) for key in ("uniform_sampling",
                                                                                          "group_num")}

    project = setup([f"configs/{family}", "configs/sft.yaml"])
    original = setup(official(family, "sft.yaml"))
    assert project == original and project[0] == 2


@pytest.mark.parametrize("latent_frames", [3, 13, 21, 41])
def test_decoding_uses_the_originals_chunks_by_default(latent_frames):
    from satvideo.vae.autoencoder import original_chunk_frames
    from satvideo.vae.causal_conv import time_chunks

    count = min(10, latent_frames // 2) or 1  # the original: this many chunks, the first (T % count) one longer
    original = [latent_frames // count + (index < latent_frames % count) for index in range(count)]
    chunks = time_chunks(latent_frames, original_chunk_frames(latent_frames))
    assert [chunk.stop - chunk.start for chunk in chunks] == original
    assert load_config([]).args.decode_chunk_frames == "original"


def test_the_default_decode_of_a_161_frame_video_is_the_originals_4_frame_chunking():
    torch.manual_seed(0)
    engine = VideoDiffusionEngine.from_config(load_config(["configs/tiny/model.yaml", "configs/tiny/vae.yaml"]).model)
    latents = torch.randn(1, 41, 16, 2, 2, generator=torch.Generator().manual_seed(0))  # [B, T', C, h, w]
    with torch.no_grad():
        default, four, two = (engine.decode_first_stage(latents, **chunking) for chunking in
                              ({}, {"chunk_frames": 4}, {"chunk_frames": 2}))
    assert default.shape == (1, 161, 3, 16, 16) and torch.equal(default, four) and not torch.equal(default, two)
