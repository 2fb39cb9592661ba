"""Official CogVideoX SAT configs run unmodified: only local paths and, for the CPU runs, sizes are overridden.

tests/official_configs/ holds copies in the exact format of THUDM/CogVideo `sat/configs/` (paths replaced by
placeholders). Full-size networks are built on the meta device; T5 and the VAE need weights, so the end-to-end
run swaps in the tiny T5 and tiny VAE and shrinks the transformer with `key=value` overrides.
"""

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from test_training import run

from satvideo.config import ConfigError, args_namespace, instantiate_from_config, load_config
from satvideo.data.toy import make_toy_dataset
from satvideo.data.video import read_mp4
from satvideo.config import OFFICIAL_KEYS_WITHOUT_EFFECT
from satvideo.engine import VideoDiffusionEngine, trainable_filter
from satvideo.checkpoint import MODEL_STATES, read_latest
from satvideo.training.deepspeed_setup import deepspeed_config

OFFICIAL = Path(__file__).parent / "official_configs"
LORA_BASES = {"cogvideox_2b_lora.yaml": "cogvideox_2b.yaml", "cogvideox_5b_lora.yaml": "cogvideox_5b.yaml",
              "cogvideox_5b_i2v_lora.yaml": "cogvideox_5b_i2v.yaml"}
MODEL_CONFIGS = ["cogvideox_2b.yaml", "cogvideox_5b.yaml", "cogvideox_5b_i2v.yaml", "cogvideox1.5_5b.yaml",
                 "cogvideox1.5_5b_i2v.yaml", *LORA_BASES]
META = "model.network_config.params.device=meta"


def official(*names: str) -> list[str]:
    return [str(OFFICIAL / name) for name in names]


def build_network_on_meta(name: str):
    config = load_config(official(name), [META])
    return config.model.network_config.params, instantiate_from_config(config.model.network_config)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_with_sft_and_inference_merges_and_keeps_official_values(name):
    train = load_config(official(name, "sft.yaml"))
    assert train.args.mode == "finetune" and train.args.checkpoint_activations is True
    assert "only_log_video_latents" not in train.args  # official keys without effect are dropped
    assert train.data.params.skip_frms_num == 3.0
    assert train.deepspeed.optimizer.params.eps == 1e-8  # `eps: 1e-8` is a float, not the string YAML 1.1 gives
    sample = load_config(official(name, "inference.yaml"))
    assert list(sample.args.sampling_image_size) == [768, 1360] and sample.args.sampling_num_frames == 22
    assert "force_inference" not in sample.args and sample.args.bf16 is True


def test_placeholder_paths_inside_lists_are_overridden_by_index():
    t5 = "model.conditioner_config.params.emb_models.0.params.model_dir"
    config = load_config(official("cogvideox_5b.yaml"), [f"{t5}=/weights/t5-v1_1-xxl"])
    embedder = config.model.conditioner_config.params.emb_models[0]
    assert embedder.params.model_dir == "/weights/t5-v1_1-xxl" and embedder.params.max_length == 226
    assert embedder.ucg_rate == 0.1
    with pytest.raises(ConfigError, match=r"cannot apply override 'model.conditioner_config.params.emb_models.1"):
        load_config(official("cogvideox_5b.yaml"), [t5.replace(".0.", ".1.") + "=/weights/t5"])


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_full_size_network_builds_on_meta_through_the_alias_table(name):
    params, network = build_network_on_meta(name)
    assert all(parameter.device.type == "meta" for parameter in network.parameters())
    assert len(network.transformer.layers) == params.num_layers and network.transformer.hidden_size == params.hidden_size
    patch = params.patch_size if isinstance(params.patch_size, int) else None
    patch_volume = patch * patch if patch else params.patch_size[0] * params.patch_size[1] * params.patch_size[2]
    embed = network.mixins.patch_embed
    assert embed.proj.weight[0].numel() == params.in_channels * patch_volume
    assert embed.proj.bias is not None  # the official ImagePatchEmbeddingMixin always has a bias (1.5 too)
    assert embed.text_proj.weight.shape == (params.hidden_size, 4096)
    assert (network.ofs_embed is not None) == ("ofs_embed_dim" in params)


@pytest.mark.parametrize("name", sorted(LORA_BASES))
def test_lora_config_adds_rank_r_adapters_to_every_layer_and_trains_only_them(name):
    params, network = build_network_on_meta(name)
    _, base = build_network_on_meta(LORA_BASES[name])
    rank, hidden = params.modules.lora_config.params.r, params.hidden_size
    adapters = {key: p.numel() for key, p in network.named_parameters() if "matrix_" in key}
    # per layer: A [r, h] and B [h, r] for each of q, k, v and the output projection
    assert sum(adapters.values()) == params.num_layers * 4 * 2 * rank * hidden
    assert sum(p.numel() for p in network.parameters()) - sum(adapters.values()) == \
        sum(p.numel() for p in base.parameters())
    is_trainable = trainable_filter(list(load_config(official(name)).model.not_trainable_prefixes))
    assert {key for key, _ in network.named_parameters() if is_trainable(key)} == set(adapters)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_official_model_key_is_accepted_by_the_engine_and_the_parts_build(name):
    model = load_config(official(name)).model
    accepted = set(inspect.signature(VideoDiffusionEngine.__init__).parameters) - {"self"}
    assert set(model) - accepted - OFFICIAL_KEYS_WITHOUT_EFFECT["model"] == set()
    assert OFFICIAL_KEYS_WITHOUT_EFFECT["model"].isdisjoint(accepted)  # a key with an effect must not be dropped
    sampler = instantiate_from_config(model.sampler_config)
    assert type(sampler.guider).__name__ == "DynamicCFG" and sampler.num_steps == 50
    instantiate_from_config(model.denoiser_config)
    instantiate_from_config(model.loss_fn_config)


def test_sft_deepspeed_section_is_accepted_by_deepspeed():
    config = load_config(official("cogvideox_5b.yaml", "sft.yaml"))
    ds = deepspeed_config(config, args_namespace(config), on_gpu=True)
    parsed = DeepSpeedConfig(ds)  # world size 1: no process group needed
    assert parsed.zero_optimization_stage == 2 and parsed.zero_allow_untested_optimizer
    assert parsed.zero_config.offload_optimizer is None  # deprecated `cpu_offload: false`: no offload
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.gradient_clipping == 0.1 and parsed.train_batch_size == 2
    assert not parsed.zero_config.contiguous_gradients and parsed.zero_config.reduce_bucket_size == 10**9

    offload = load_config(official("sft.yaml"), ["deepspeed.zero_optimization.cpu_offload=true"])
    assert DeepSpeedConfig(deepspeed_config(offload, args_namespace(offload), on_gpu=True)) \
        .zero_config.offload_optimizer.device == "cpu"  # the deprecated key still acts

    on_cpu = load_config(official("sft.yaml"), ["deepspeed.optimizer.type=AdamW"])
    ds = deepspeed_config(on_cpu, args_namespace(on_cpu), on_gpu=False)
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert DeepSpeedConfig(ds).optimizer_params["betas"] == [0.9, 0.95]


def test_official_data_section_builds_sft_dataset_and_skips_frames(tmp_path):
    pairs = make_toy_dataset(tmp_path, num=4, size=32, frames=17, fps=8)
    config = load_config(official("sft.yaml"), ["data.params.video_size=[32,32]", "data.params.max_num_frames=9"])
    dataset = instantiate_from_config(config.data, data_dir=str(tmp_path))  # `skip_frms_num: 3.`, fps 8
    assert len(dataset) == 4
    source, _ = read_mp4(pairs[0][0])
    expected = torch.from_numpy(source[3:12]).permute(0, 3, 1, 2).float() / 127.5 - 1  # frames 3..11 of 17
    torch.testing.assert_close(dataset[0]["mp4"], expected)

    config.data.params.skip_frms_num = 3.5
    with pytest.raises(ValueError, match=r"data.params.skip_frms_num must be a whole number of frames, got 3.5"):
        instantiate_from_config(config.data, data_dir=str(tmp_path))


# Sizes only: 1 layer, 64 wide, 4 heads of 16, 4x4 latents of 9-frame 32x32 clips, 16 text tokens of width 32.
TINY_SIZES = [f"model.network_config.params.{key}" for key in (
    "num_layers=1", "hidden_size=64", "num_attention_heads=4", "time_embed_dim=32", "latent_width=4",
    "latent_height=4", "num_frames=9", "modules.pos_embed_config.params.hidden_size_head=16",
    "modules.pos_embed_config.params.text_length=16", "modules.patch_embed_config.params.text_hidden_size=32")]
# T5-XXL and the VAE need weights: the tiny random T5 replaces the embedder, configs/tiny/vae.yaml the VAE sizes.
TINY_T5 = ("model.conditioner_config.params.emb_models=[{is_trainable: false, input_key: txt, ucg_rate: 0.1, "
           "target: satvideo.conditioner.TinyT5Embedder, params: {max_length: 16, d_model: 32}}]")
TINY_PARTS = [*TINY_SIZES, TINY_T5, "model.first_stage_config.params.ckpt_path=null"]


@pytest.mark.slow
def test_official_5b_sft_and_inference_configs_train_and_sample_on_cpu(tmp_path):
    make_toy_dataset(tmp_path / "data", num=4, size=32, frames=17, fps=8)
    save, out_dir, prompts = tmp_path / "run", tmp_path / "videos", tmp_path / "prompts.txt"
    model = [*official("cogvideox_5b.yaml"), "configs/tiny/vae.yaml"]
    # `sat.ops.FusedEmaAdam` is a CUDA optimizer: on the CPU the official file's one GPU-only setting is
    # replaced by torch's AdamW. Its bf16 (5B) setting is kept; its fp16 section is already disabled.
    output = run([sys.executable, "train_video.py", "--base", *model, *official("sft.yaml"), *TINY_PARTS,
                  "data.params.video_size=[32,32]", "data.params.max_num_frames=9", "deepspeed.optimizer.type=AdamW",
                  "args.load=null", f"args.save={save}", f"args.train_data=[{tmp_path / 'data'}]",
                  f"args.valid_data=[{tmp_path / 'data'}]",  # the official eval_interval validates
                  "args.train_iters=2", "args.num_workers=0"])
    assert "iteration 2 | loss" in output and read_latest(save) == 2
    module = torch.load(save / "2" / MODEL_STATES, weights_only=True)["module"]
    assert all(key.startswith("model.diffusion_model.") for key in module)
    assert {tensor.dtype for tensor in module.values()} == {torch.bfloat16}  # the official bf16 setting acted

    prompts.write_text("a red square moving left\n")
    run([sys.executable, "sample_video.py", "--base", *model, *official("inference.yaml"), *TINY_PARTS,
         f"args.load={save}", f"args.input_file={prompts}", f"args.output_dir={out_dir}",
         "args.sampling_image_size=[32,32]", "args.sampling_num_frames=3",
         "model.sampler_config.params.num_steps=2", "model.sampler_config.params.guider_config.params.num_steps=2"])
    records = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records] == ["a red square moving left"]
    frames, fps = read_mp4(out_dir / records[0]["file"])
    assert frames.shape == (9, 32, 32, 3) and round(fps) == 16  # 3 latent frames; official sampling_fps 16


def test_5b_i2v_sampling_refuses_sizes_and_lengths_its_learnable_position_table_does_not_cover(tmp_path):
    import re

    import numpy as np
    from PIL import Image

    from satvideo.sampling import VideoPlan, VideoRequest

    def plan(*overrides: str) -> VideoPlan:
        config = load_config(["configs/cogvideox_5b_i2v.yaml", "configs/inference.yaml"],
                             [*TINY_SIZES, "args.image2video=true", *overrides])
        return VideoPlan(args_namespace(config), config.model.network_config.params)

    table = re.escape("this model's learnable position table (pos_embed_config.params.learnable_pos_embed) covers "
                      "32x32 and at most 9 frames")
    with pytest.raises(ConfigError, match=rf"^args.sampling_num_frames and args.sampling_image_size: 9 frames at "
                                          rf"64x64; {table}$"):
        plan("args.sampling_image_size=[64,64]")
    with pytest.raises(ConfigError, match=rf"^args.sampling_num_frames and args.sampling_image_size: 17 frames at "
                                          rf"32x32; {table}$"):
        plan("args.sampling_num_frames=5")
    assert plan("args.sampling_num_frames=1").latent_frames == 1  # fewer frames take the table's first rows
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    configured = plan()  # 32x32, 9 frames (3 latent): the table's grid
    configured.check(VideoRequest(index=0, prompt="a cat", seed=0, image=str(image), num_frames=9))
    with pytest.raises(ConfigError, match=rf"^request 1 \('a cat'\): num_frames: 17 frames at 32x32; {table}$"):
        configured.check(VideoRequest(index=1, prompt="a cat", seed=0, image=str(image), num_frames=17))
