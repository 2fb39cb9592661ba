"""What the first run on a GPU host needs, checked on the CPU: one decision for device, backend and DeepSpeed
accelerator; every part in the run's dtype; precision flags that cannot conflict; optimizers that need no
compiler; noise drawn where the generator lives; RNG state for the current device only."""

from argparse import Namespace

import pytest
import torch
from omegaconf import OmegaConf
from test_official_configs import official

from satvideo import distributed
from satvideo.config import ConfigError, args_namespace, load_config
from satvideo.diffusion import VPSDEDPMPP2MSampler
from satvideo.training import deepspeed_setup
from satvideo.training.deepspeed_setup import (build_optimizer, deepspeed_config, skip_allreduce_over_one_rank,
                                               training_dtype)
from satvideo.training.guards import SkipsNonFiniteSteps
from satvideo.training.loop import build_deepspeed_engine, rng_state, set_rng_state

TINY = ["configs/tiny/model.yaml", "configs/tiny/vae.yaml", "configs/tiny/train.yaml"]


# --- device, backend, accelerator ------------------------------------------------------------------------

def test_cpu_run_on_a_cuda_host_uses_deepspeeds_cpu_accelerator(monkeypatch):
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA host ...
    set_accelerator(CUDA_Accelerator())  # ... on which DeepSpeed picked CUDA by itself
    device = distributed.init_device("cpu")
    assert device == torch.device("cpu") and get_accelerator().device_name() == "cpu"
    assert torch.distributed.get_backend() == "gloo"


def test_cuda_hidden_means_cpu_and_asking_for_cuda_is_an_error(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_device(None) == torch.device("cpu")
    assert get_accelerator().device_name() == "cpu"
    with pytest.raises(ConfigError, match="args.device=cuda: no CUDA device is visible"):
        distributed.init_device("cuda")
    with pytest.raises(ConfigError, match=r"args.device='gpu': expected cpu, cuda or null"):
        distributed.init_device("gpu")


# --- dtype of every part after set-up ----------------------------------------------------------------------

def set_up(*overrides):
    config = load_config(TINY, ["args.save=null", *overrides])
    args = args_namespace(config)
    device = distributed.init_device("cpu")
    ds = deepspeed_config(config, args, on_gpu=False)
    model, _ = build_deepspeed_engine(config, args, ds, device, load_weights=False)
    return model.module


def tensor_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}


@pytest.mark.parametrize("overrides, dtype", [((), torch.float32), (("args.bf16=true",), torch.bfloat16)])
def test_every_part_has_the_runs_dtype_after_set_up(overrides, dtype):
    engine = set_up(*overrides)
    assert {p.dtype for p in engine.network.parameters()} == {dtype}
    assert tensor_dtypes(engine.conditioner) == {dtype}
    assert tensor_dtypes(engine.first_stage_model) == {dtype}
    assert {p.device.type for p in [*engine.conditioner.parameters(), *engine.first_stage_model.parameters()]} == {"cpu"}


def test_fp16_casts_t5_and_vae_but_keeps_t5s_fp32_modules():
    # fp16 training needs a GPU; the cast itself is checked by construction
    config = load_config(TINY)
    from satvideo.engine import VideoDiffusionEngine

    engine = VideoDiffusionEngine.from_config(config.model)
    engine.place_frozen_parts(torch.device("cpu"), torch.float16)
    t5 = {name: p.dtype for name, p in engine.conditioner.named_parameters()}
    assert {dtype for name, dtype in t5.items() if ".wo." in name} == {torch.float32}  # transformers' choice
    assert {dtype for name, dtype in t5.items() if ".wo." not in name} == {torch.float16}
    assert tensor_dtypes(engine.first_stage_model) == {torch.float16}
    with pytest.raises(ConfigError, match="fp16 training needs a GPU"):
        deepspeed_config(config, Namespace(**{**vars(args_namespace(config)), "fp16": True}), on_gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_set_up_on_gpu():
    config = load_config(TINY, ["args.save=null", "args.fp16=true", "args.device=cuda"])
    args = args_namespace(config)
    device = distributed.init_device("cuda")
    model, _ = build_deepspeed_engine(config, args, deepspeed_config(config, args, on_gpu=True), device, False)
    assert {p.dtype for p in model.module.network.parameters()} == {torch.float16}
    assert tensor_dtypes(model.module.first_stage_model) == {torch.float16}


# --- precision flags -----------------------------------------------------------------------------------------

def precision(*files, overrides=()):
    config = load_config([*files], list(overrides))
    ds = deepspeed_config(config, args_namespace(config), on_gpu=True)
    return training_dtype(ds), (ds["fp16"]["enabled"], ds["bf16"]["enabled"])


def test_family_configs_state_their_precision_and_flags_override_the_section():
    assert precision("configs/cogvideox_2b.yaml", "configs/sft.yaml") == (torch.float16, (True, False))
    assert precision("configs/cogvideox_5b.yaml", "configs/sft.yaml") == (torch.bfloat16, (False, True))
    # the official sft.yaml enables bf16 in its section: the 2B family's args.fp16 wins
    assert precision("configs/cogvideox_2b.yaml", *official("sft.yaml")) == (torch.float16, (True, False))
    # a later file or the command line switches precision, the other flag goes off
    assert precision("configs/cogvideox_5b.yaml", "configs/sft.yaml",
                     overrides=["args.fp16=true"]) == (torch.float16, (True, False))
    assert precision("configs/cogvideox_2b.yaml", overrides=["args.bf16=true"]) == (torch.bfloat16, (False, True))
    assert precision(*official("sft.yaml")) == (torch.bfloat16, (False, True))  # the section alone
    assert precision("configs/tiny/train.yaml") == (torch.float32, (False, False))


def test_conflicting_precision_is_an_error(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("args: {fp16: true, bf16: true}\n")
    with pytest.raises(ConfigError, match=r"both.yaml: args.fp16 and args.bf16 are both true"):
        load_config([str(both)])
    sections = OmegaConf.create({"deepspeed": {"fp16": {"enabled": True}, "bf16": {"enabled": True}}})
    with pytest.raises(ConfigError, match="deepspeed.fp16.enabled and deepspeed.bf16.enabled are both true"):
        deepspeed_config(sections, Namespace(batch_size=None, zero_stage=None, fp16=False, bf16=False), on_gpu=True)


# --- optimizers ------------------------------------------------------------------------------------------

ARGS = Namespace(batch_size=1, zero_stage=2, fp16=False, bf16=True)


def completed(optimizer: dict, on_gpu: bool) -> dict:
    return deepspeed_config(OmegaConf.create({"deepspeed": {"optimizer": optimizer}}), ARGS, on_gpu=on_gpu)


def test_adamw_is_torchs_fused_adamw_on_a_gpu_without_prebuilt_ops(monkeypatch):
    monkeypatch.setattr(deepspeed_setup, "deepspeed_op_prebuilt", lambda name: False)
    params = completed({"type": "AdamW", "params": {"lr": 1e-4}}, on_gpu=True)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    on_cpu = completed({"type": "AdamW", "params": {"lr": 1e-4}}, on_gpu=False)["optimizer"]["params"]
    assert on_cpu["torch_adam"] is True and "fused" not in on_cpu
    monkeypatch.setattr(deepspeed_setup, "deepspeed_op_prebuilt", lambda name: name == "fused_adam")
    assert completed({"type": "AdamW"}, on_gpu=True)["optimizer"]["params"]["torch_adam"] is False  # prebuilt


def test_compiled_optimizers_need_a_compiler(monkeypatch):
    monkeypatch.setattr(deepspeed_setup, "deepspeed_op_prebuilt", lambda name: False)
    monkeypatch.setattr(deepspeed_setup, "can_compile_cuda_ops", lambda: False)
    with pytest.raises(ConfigError, match=r"torch_adam=false asks for DeepSpeed's FusedAdam, which is not prebuilt"):
        completed({"type": "AdamW", "params": {"torch_adam": False}}, on_gpu=True)
    official_ds = deepspeed_config(load_config(official("sft.yaml")), args_namespace(load_config(official("sft.yaml"))),
                                   on_gpu=True)
    assert official_ds["zero_allow_untested_optimizer"] is True
    with pytest.raises(ConfigError, match=r"'sat.ops.FusedEmaAdam' compiles a CUDA extension at first use and this "
                                          r"machine has no nvcc/CUDA_HOME or ninja: use type: AdamW"):
        build_optimizer(official_ds, [], on_gpu=True)


def test_class_path_optimizer_under_zero_is_allowed_and_built(monkeypatch):
    ds = completed({"type": "torch.optim.SGD", "params": {"lr": 0.1}}, on_gpu=False)
    assert ds["zero_allow_untested_optimizer"] is True
    optimizer = build_optimizer(ds, [{"params": [torch.nn.Parameter(torch.zeros(2))]}], on_gpu=False)
    assert isinstance(optimizer, torch.optim.SGD) and "optimizer" not in ds


def stage_0(optimizer: dict, bf16: bool = False) -> dict:
    args = Namespace(batch_size=1, zero_stage=0, fp16=False, bf16=bf16)
    return deepspeed_config(OmegaConf.create({"deepspeed": {"optimizer": optimizer}}), args, on_gpu=False)


def test_stage_0_in_fp32_builds_torchs_adam_with_the_non_finite_skip_and_clips_in_it():
    ds = stage_0({"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}})
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["optimizer"] == {"type": "torch.optim.AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}}
    assert stage_0({"type": "Adam", "params": {"adam_w_mode": False}})["optimizer"]["type"] == "torch.optim.Adam"
    assert stage_0({"type": "Adam"})["optimizer"]["type"] == "torch.optim.AdamW"  # DeepSpeed's adam_w_mode default
    lamb = stage_0({"type": "Lamb"})  # DeepSpeed's own optimizer without the skip: its ZeRO stage 1 skips
    assert lamb["zero_optimization"]["stage"] == 1 and lamb["optimizer"]["type"] == "Lamb"
    bf16 = stage_0({"type": "AdamW"}, bf16=True)  # DeepSpeed's bf16 optimizer skips non-finite steps itself
    assert bf16["zero_optimization"]["stage"] == 0 and bf16["optimizer"]["type"] == "AdamW"

    parameter = torch.nn.Parameter(torch.ones(4))
    optimizer = build_optimizer(ds, [{"params": [parameter]}], on_gpu=False)
    assert isinstance(optimizer, torch.optim.AdamW) and isinstance(optimizer, SkipsNonFiniteSteps)
    assert ds["gradient_clipping"] == 0.0
    assert optimizer.max_grad_norm == 1.0  # DeepSpeed's default clipping, now the optimizer's
    reference = torch.nn.Parameter(torch.ones(4))
    plain = torch.optim.AdamW([reference], lr=1e-3, betas=(0.9, 0.95))
    for gradient in (torch.tensor([3.0, -4.0, 0.0, 0.0]), torch.tensor([0.1, 0.2, -0.3, 0.0])):
        parameter.grad, reference.grad = gradient.clone(), gradient.clone()
        torch.nn.utils.clip_grad_norm_([reference], 1.0)
        optimizer.step()
        plain.step()
        assert torch.equal(parameter, reference) and not optimizer.overflow
    assert optimizer._global_grad_norm == pytest.approx(0.374166, rel=1e-5)  # before clipping, as ZeRO reports it
    before = {key: value.clone() for key, value in optimizer.state[parameter].items()}
    parameter.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    optimizer.step()
    assert optimizer.overflow and optimizer._global_grad_norm == float("inf")
    assert torch.equal(parameter, reference)
    assert all(torch.equal(before[key], value) for key, value in optimizer.state[parameter].items())


def test_stage_0_all_reduces_only_over_more_than_one_rank(monkeypatch):
    config = load_config(TINY, ["args.zero_stage=0"])
    args = args_namespace(config)
    model, _ = build_deepspeed_engine(config, args, deepspeed_config(config, args, on_gpu=False),
                                      torch.device("cpu"), False)
    assert isinstance(model.optimizer, SkipsNonFiniteSteps)
    assert model.enable_backward_allreduce is False  # one rank: the all-reduce would only copy every gradient twice
    model.enable_backward_allreduce = True
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    skip_allreduce_over_one_rank(model)
    assert model.enable_backward_allreduce is True


# --- noise and RNG state -----------------------------------------------------------------------------------

def sde_sampler() -> VPSDEDPMPP2MSampler:
    discretization = {"target": "satvideo.diffusion.ZeroSNRDDPMDiscretization", "params": {"shift_scale": 1.0}}
    return VPSDEDPMPP2MSampler(num_steps=4, discretization_config=discretization)


def test_sde_noise_is_drawn_where_the_generator_lives():
    sampler = sde_sampler()
    _, alphas = sampler.schedule()
    x, x0 = torch.randn(1, 2, 3, 4, 4), torch.zeros(1, 2, 3, 4, 4)
    first = sampler.update(x, x0, None, alphas, 1, torch.Generator().manual_seed(5))
    again = sampler.update(x, x0, None, alphas, 1, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    # the model's tensors on another device ('meta' stands in for cuda): the CPU generator still draws
    on_meta = sampler.update(x.to("meta"), x0.to("meta"), None, alphas, 1, torch.Generator().manual_seed(5))
    assert on_meta.device.type == "meta" and on_meta.shape == x.shape


def test_rng_state_holds_only_the_current_devices_generator():
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)  # saved on a GPU host with more devices
    set_rng_state(state, torch.device("cpu"))  # resumed on fewer: no IndexError, the CPU streams restored
    expected = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
