"""Training: real runs of train_video.py (one process and torchrun over gloo), resume, checkpoints, settings."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from satvideo.config import CheckpointError, ConfigError
from satvideo.data.toy import make_toy_dataset
from satvideo.checkpoint import (MODEL_STATES, load_network, network_state_dict, read_latest,
                                 write_latest)
from satvideo.training.data_order import ResumableSampler
from satvideo.training.deepspeed_setup import deepspeed_config
from satvideo.training.loop import save_checkpoint
from satvideo.training.lr_schedule import lr_multiplier, warmup_iterations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["configs/tiny/model.yaml", "configs/tiny/vae.yaml", "configs/tiny/train.yaml"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    make_toy_dataset(folder, num=16, size=32, frames=9, fps=8, seed=0)
    return str(folder)


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(command: list[str], timeout: int = 300, stdin: str | None = None, **extra_env: str) -> str:
    """Run a command from the repository root as a fresh process (no process-group variables inherited), `stdin`
    typed into it."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra_env)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def train(save, data, *overrides, nproc: int = 1) -> str:
    launcher = [sys.executable, "train_video.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_video.py"]
    return run(launcher + ["--base", *TINY, f"args.save={save}", f"args.train_data=[{data}]", "args.num_workers=0",
                           *overrides])


def metrics(save) -> list[dict]:
    with open(os.path.join(save, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


# The run interrupted_and_resumed makes: 6 iterations, logged every one, saved every second.
RESUMED_RUN = ("args.train_iters=6", "args.log_interval=1", "args.save_interval=2", "args.batch_size=2")


def interrupted_and_resumed(tmp_path, data, *overrides, nproc: int) -> Path:
    """A run to 6, then resumed from its iteration-4 checkpoint (as if it had died there): it ends bit-identical to
    the uninterrupted run and logs the same losses. Returns the run folder."""
    common = (*RESUMED_RUN, *overrides)
    save = tmp_path / "run"
    train(str(save), data, *common, nproc=nproc)
    expected, losses = network_state_dict(str(save)), [r["loss"] for r in metrics(save)]
    subprocess.run(["rm", "-rf", str(save / "6")], check=True)
    write_latest(str(save), 4)
    output = train(str(save), data, *common, nproc=nproc)
    assert "at iteration 4" in output
    got = network_state_dict(str(save))
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert [r["loss"] for r in metrics(save)] == losses
    return save


@pytest.mark.slow
def test_two_rank_zero2_run_writes_sat_checkpoint_that_sample_video_loads_and_stage_0_resumes_to_its_losses(
        tmp_path, toy_data):
    """ZeRO-2 over two ranks writes a SAT-layout checkpoint that sample_video loads. ZeRO stage 0 in fp32 (DeepSpeed
    all-reduces the gradients, satvideo's optimizer with its non-finite skip and clipping steps on whole tensors, its
    state saved whole, not in ZeRO partitions) resumes bit-exactly and logs ZeRO-2's losses and gradient norms."""
    save = str(tmp_path / "zero_2")
    output = train(save, toy_data, *RESUMED_RUN, "args.zero_stage=2", nproc=2)
    assert "iteration 6 | loss" in output
    assert read_latest(save) == 6
    files = sorted(os.listdir(os.path.join(save, "6")))
    assert MODEL_STATES in files
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)
    module = torch.load(os.path.join(save, "6", MODEL_STATES), weights_only=True)["module"]
    assert all(key.startswith("model.diffusion_model.") for key in module)  # no T5, no VAE
    assert "model.diffusion_model.mixins.adaln_layer.adaLN_modulations.0.1.weight" in module

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\na blue circle moving up\n")
    out_dir = tmp_path / "videos"
    run([sys.executable, "sample_video.py", "--base", "configs/tiny/model.yaml", "configs/tiny/vae.yaml",
         "configs/tiny/sample.yaml", f"args.load={save}", f"args.input_file={prompts}", f"args.output_dir={out_dir}",
         "model.sampler_config.params.num_steps=4", "model.sampler_config.params.guider_config.params.num_steps=4"])
    records = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records] == ["a red square moving left", "a blue circle moving up"]
    from satvideo.data.video import read_mp4
    frames, fps = read_mp4(out_dir / records[0]["file"])
    assert frames.shape == (9, 32, 32, 3) and round(fps) == 8

    stage_0 = interrupted_and_resumed(tmp_path, toy_data, "args.zero_stage=0", nproc=2)
    assert not list((stage_0 / "4").glob("zero_pp_rank_*")) and (stage_0 / "4" / MODEL_STATES).exists()
    for ours, theirs in zip(metrics(stage_0), metrics(save), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_training_loss_goes_down_on_toy_data(tmp_path, toy_data):
    save = str(tmp_path / "run")
    train(save, toy_data, "args.train_iters=60", "args.log_interval=10", "args.save_interval=1000",
          "args.warmup=5", "args.lr_decay_style=constant")
    losses = [record["loss"] for record in metrics(save)]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, toy_data):
    common = ("args.log_interval=2", "args.save_interval=3", "args.batch_size=3")  # 16 // 3: epochs end mid-run
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(straight, toy_data, "args.train_iters=8", *common)
    train(resumed, toy_data, "args.train_iters=8", *common, "args.save_interval=3")
    # interrupt: keep iteration 3 only, as if the run died after its first save
    for name in ("6", "8"):
        subprocess.run(["rm", "-rf", os.path.join(resumed, name)], check=True)
    write_latest(resumed, 3)
    output = train(resumed, toy_data, "args.train_iters=8", *common)
    assert "resumed from" in output and "at iteration 3" in output
    final_straight, final_resumed = network_state_dict(straight), network_state_dict(resumed)
    assert final_straight.keys() == final_resumed.keys()
    for key in final_straight:
        assert torch.equal(final_straight[key], final_resumed[key]), key
    # the logs too: a line at each checkpoint (3, 6, 8) besides every log_interval, so no window spans the resume
    timing = ("step_time", "samples_per_s", "peak_memory_gb")
    logged = [[{key: value for key, value in record.items() if key not in timing} for record in metrics(run)]
              for run in (straight, resumed)]
    assert [record["iteration"] for record in logged[0]] == [2, 3, 4, 6, 8] and logged[1] == logged[0]


def test_latest_is_only_written_after_a_complete_save(tmp_path):
    class FailingEngine:
        module, device = torch.nn.Linear(2, 2), torch.device("cpu")

        def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
            os.makedirs(os.path.join(save_dir, tag))
            raise OSError("disk full")

    write_latest(tmp_path, 100)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(FailingEngine(), Namespace(save=str(tmp_path), keep_last=None), 200, torch.device("cpu"))
    assert read_latest(tmp_path) == 100
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(CheckpointError, match="latest should hold an iteration number, found 'garbage'"):
        read_latest(tmp_path)


def test_load_network_reports_missing_and_unexpected_keys_and_ignores_frozen_extras(tmp_path, caplog):
    from conftest import tiny_network_config
    from satvideo.config import instantiate_from_config

    network = instantiate_from_config(tiny_network_config("5b"))
    module = {f"model.diffusion_model.{k}": v for k, v in network.state_dict().items()}
    module["conditioner.embedders.0.transformer.shared.weight"] = torch.zeros(3)  # official fine-tunes carry T5
    module["model.diffusion_model.transformer.position_embeddings.weight"] = torch.zeros(64, 64)
    os.makedirs(tmp_path / "ckpt" / "7")
    torch.save({"module": module}, tmp_path / "ckpt" / "7" / MODEL_STATES)
    write_latest(tmp_path / "ckpt", 7)
    load_network(network, tmp_path / "ckpt")  # run folder -> latest -> iteration 7: loads cleanly
    with caplog.at_level("WARNING", logger="satvideo.checkpoint"):
        load_network(network, tmp_path / "ckpt", lora_base=str(tmp_path))
    assert f"args.lora_base={tmp_path} is not used: {tmp_path / 'ckpt' / '7' / MODEL_STATES} holds full weights" \
        in caplog.text

    del module["model.diffusion_model.time_embed.0.weight"]
    module["model.diffusion_model.extra.weight"] = torch.zeros(1)
    torch.save({"module": module}, tmp_path / "ckpt" / "7" / MODEL_STATES)
    with pytest.raises(CheckpointError,
                       match=r"missing keys \(1\): time_embed\.0\.weight; unexpected keys \(1\): extra\.weight"):
        load_network(network, tmp_path / "ckpt" / "7")
    load_network(network, tmp_path / "ckpt" / "7" / MODEL_STATES, strict=False)

    # a weight of another shape is named with both shapes; without strict the rest loads and it keeps its value
    bias = "model.diffusion_model.time_embed.0.bias"
    module[bias] = torch.ones(module[bias].shape[0] + 1)
    torch.save({"module": module}, tmp_path / "ckpt" / "7" / MODEL_STATES)
    expected_bias = network.time_embed[0].bias.detach().clone()
    width = expected_bias.shape[0]
    with pytest.raises(CheckpointError, match=rf"shapes differ, checkpoint vs model \(1\): time_embed\.0\.bias "
                                              rf"\({width + 1},\) vs \({width},\)"):
        load_network(network, tmp_path / "ckpt" / "7")
    load_network(network, tmp_path / "ckpt" / "7", strict=False)
    assert torch.equal(network.time_embed[0].bias, expected_bias)
    with pytest.raises(FileNotFoundError, match="checkpoint path .*nowhere does not exist"):
        load_network(network, tmp_path / "nowhere")
    module[bias] = torch.full((width,), float("nan"))
    module["model.diffusion_model.mixins.patch_embed.proj.weight"].view(-1)[0] = float("inf")
    torch.save({"module": module}, tmp_path / "ckpt" / "7" / MODEL_STATES)
    with pytest.raises(CheckpointError, match=r"7/mp_rank_00_model_states.pt: 2 weight tensors hold NaN or inf "
                                              r"\(the first: mixins.patch_embed.proj.weight\); the file is damaged$"):
        load_network(network, tmp_path / "ckpt", strict=False)  # strict or not: sampled, it gives black videos


def test_lora_layers_load_base_and_lora_checkpoints_and_report_what_sat_would_not(tmp_path):
    """SAT's LoRA layers load a plain projection's weight as `original.weight` and report no missing or resized
    keys themselves: the check names them, with the rank or overlay to set."""
    import random

    import numpy as np
    from conftest import save_sat, tiny_network_config
    from satvideo.config import instantiate_from_config

    torch.manual_seed(0)
    plain = instantiate_from_config(tiny_network_config("5b")).state_dict()
    qkv = "transformer.layers.1.attention.query_key_value"
    # an official checkpoint as SAT saves it by default: random-number states beside the weights
    rng = dict(np_rng_state=np.random.get_state(), random_rng_state=random.getstate(),
               torch_rng_state=torch.get_rng_state(), iteration=7)
    base = save_sat(plain, tmp_path / "base", **rng)
    lora = instantiate_from_config(tiny_network_config("5b", lora_rank=4))
    load_network(lora, base)
    assert torch.equal(lora.state_dict()[f"{qkv}.original.weight"], plain[f"{qkv}.weight"])

    lora_state = lora.state_dict()  # SAT's full LoRA layout: original.weight, matrix_A.i, matrix_B.i
    lora_state[f"{qkv}.matrix_B.2"] = torch.randn_like(lora_state[f"{qkv}.matrix_B.2"])
    official_lora = save_sat(lora_state, tmp_path / "lora", **rng)
    load_network(lora, official_lora)
    assert torch.equal(lora.state_dict()[f"{qkv}.matrix_B.2"], lora_state[f"{qkv}.matrix_B.2"])

    without_qkv = save_sat({k: v for k, v in plain.items() if not k.startswith(qkv)}, tmp_path / "no_qkv")
    with pytest.raises(CheckpointError, match=rf"missing keys \(2\): {qkv}.original.weight, {qkv}.original.bias"):
        load_network(lora, without_qkv)
    wider = save_sat({**plain, f"{qkv}.weight": torch.zeros(3 * 64, 65)}, tmp_path / "wider")
    with pytest.raises(CheckpointError, match=rf"shapes differ, checkpoint vs model \(1\): {qkv}.original.weight "
                                              r"\(192, 65\) vs \(192, 64\)"):
        load_network(lora, wider)
    rank_8 = instantiate_from_config(tiny_network_config("5b", lora_rank=8))
    with pytest.raises(CheckpointError, match=r"does not match the model config \(its LoRA layers have rank 4: set "
                                              r"model.network_config.params.modules.lora_config.params.r=4\): "):
        load_network(rank_8, official_lora)
    no_lora = instantiate_from_config(tiny_network_config("5b"))
    with pytest.raises(CheckpointError, match=r"\(it holds LoRA layers of rank 4: add configs/lora.yaml with that "
                                              r"rank\): "):
        load_network(no_lora, official_lora)


def test_sampler_partitions_data_and_resumes_mid_epoch():
    samplers = [ResumableSampler(10, rank, 3, seed=5) for rank in range(3)]
    shares = [list(sampler) for sampler in samplers]
    assert all(len(share) == 3 for share in shares)
    assert len(set(sum(shares, []))) == 9  # disjoint
    samplers[1].set_position(epoch=0, start=2)
    assert list(samplers[1]) == shares[1][2:]
    samplers[1].set_position(epoch=1, start=0)
    assert list(samplers[1]) != shares[1]


def test_lr_schedule_warms_up_then_decays_as_sat():
    # LambdaLR step s is SAT's optimizer step n = s + 1
    cosine = lr_multiplier("cosine", warmup_iters=10, decay_iters=100, decay_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(59) == pytest.approx(0.1 + 0.9 * 0.5) and cosine(109) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.1)  # progress capped at 1
    linear = lr_multiplier("linear", 0, 100)
    assert linear(49) == pytest.approx(0.5) and linear(199) == 0.0  # floored where SAT's turns negative
    assert lr_multiplier("exponential", 10, 100)(50) == 1.0  # SAT computes no decay for it
    assert warmup_iterations(0.05, 200) == 10 and warmup_iterations(30, 200) == 30
    with pytest.raises(ValueError, match="args.lr_decay_style='step'"):
        lr_multiplier("step", 0, 10)


def test_deepspeed_section_on_cpu_uses_torch_adam_and_refuses_gpu_only_settings():
    args = Namespace(batch_size=2, zero_stage=3, bf16=False, fp16=False)
    config = OmegaConf.create({"deepspeed": {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}})
    ds = deepspeed_config(config, args, on_gpu=False)
    assert ds["optimizer"]["params"]["torch_adam"] is True
    section_batch = OmegaConf.create({"deepspeed": {"train_micro_batch_size_per_gpu": 5}})
    assert deepspeed_config(section_batch, args, on_gpu=False)["train_micro_batch_size_per_gpu"] == 2  # args win
    unset = Namespace(**{**vars(args), "batch_size": None})
    assert deepspeed_config(section_batch, unset, on_gpu=False)["train_micro_batch_size_per_gpu"] == 5
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="deepspeed.fp16.enabled: fp16 training needs a GPU"):
        deepspeed_config(config, Namespace(**{**vars(args), "fp16": True}), on_gpu=False)

    from satvideo.training.deepspeed_setup import build_optimizer
    fused = deepspeed_config(OmegaConf.create({"deepspeed": {"optimizer": {"type": "sat.ops.FusedEmaAdam"}}}),
                             args, on_gpu=False)
    with pytest.raises(ConfigError, match=r"deepspeed.optimizer.type='sat.ops.FusedEmaAdam' is a fused CUDA optimizer"):
        build_optimizer(fused, [], on_gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_training_step_on_gpu(tmp_path, toy_data):
    save = str(tmp_path / "run")
    train(save, toy_data, "args.train_iters=2", "args.log_interval=1", "args.fp16=true", "args.device=null")
    assert len(metrics(save)) == 2
