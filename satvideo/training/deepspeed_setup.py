"""The `deepspeed` section completed from `args`: batch size, ZeRO stage, one precision, and an optimizer that
runs on the machine at hand without compiling anything unless asked to.

Optimizers: DeepSpeed's `Adam`/`AdamW` become torch's AdamW (`torch_adam`; fused kernels on a GPU) unless
DeepSpeed's FusedAdam is prebuilt or `torch_adam: false` asks for it explicitly. A class path (the official
`sat.ops.FusedEmaAdam`) is built here; one that compiles a CUDA extension at first use needs nvcc and ninja.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import shutil

import torch
from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT  # 1.0: DeepSpeed clips unless told not to
from omegaconf import DictConfig

from satvideo import distributed
from satvideo.config import ConfigError, check_parameters, check_value, get_obj_from_str, number_rule, to_plain
from satvideo.training.guards import SkipsNonFiniteSteps, skipping_nonfinite_steps

# DeepSpeed's own optimizer names; any other `deepspeed.optimizer.type` is imported as a class path.
DEEPSPEED_OPTIMIZERS = {"adam", "adamw", "lamb", "onebitadam", "zerooneadam", "onebitlamb", "adagrad", "lion", "muon"}
# Class-path optimizers that compile a CUDA extension the first time they are built.
COMPILED_AT_FIRST_USE = {"sat.ops.FusedEmaAdam"}
# Keys DeepSpeed reads from an Adam optimizer's params before handing the rest to torch's AdamW.
ADAM_EXTRA_KEYS = {"torch_adam", "adam_w_mode"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger(__name__)


def deepspeed_config(config: DictConfig, args, on_gpu: bool) -> dict:
    """The `deepspeed` section completed from `args` (see the module docstring)."""
    ds = copy.deepcopy(to_plain(config.get("deepspeed") or {}))
    if args.batch_size is not None:  # the command-line knob wins over the section
        ds["train_micro_batch_size_per_gpu"] = args.batch_size
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 10**9)  # satvideo prints its own log line
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    set_precision(ds, args)
    if not on_gpu and ds["fp16"]["enabled"]:
        raise ConfigError("args.fp16 / deepspeed.fp16.enabled: fp16 training needs a GPU; use fp32 or bf16 on the CPU")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {"lr": 1e-4}})
    check_optimizer(optimizer)
    if optimizer["type"].lower() in ("adam", "adamw"):
        choose_adam(optimizer.setdefault("params", {}), on_gpu)
    elif optimizer["type"].lower() not in DEEPSPEED_OPTIMIZERS and zero_stage(ds) > 0:
        ds["zero_allow_untested_optimizer"] = True  # DeepSpeed asserts on any optimizer it did not build
    if plain_fp32_step(ds):
        choose_stage_0_optimizer(ds)
    return ds


def plain_fp32_step(ds: dict) -> bool:
    """ZeRO stage 0 in fp32: DeepSpeed hands each step to the optimizer as it is, without the non-finite check its
    ZeRO, fp16 and bf16 optimizers make, so satvideo's optimizer makes it (guards.SkipsNonFiniteSteps)."""
    return zero_stage(ds) == 0 and training_dtype(ds) == torch.float32


def choose_stage_0_optimizer(ds: dict) -> None:
    """Under `plain_fp32_step`, Adam/AdamW by name become the torch class DeepSpeed would build (AdamW unless type
    Adam sets adam_w_mode: false), built by `build_optimizer` with the non-finite skip. A DeepSpeed optimizer
    without a torch equivalent runs under stage 1 instead, whose optimizer skips (on one GPU stage 1 partitions
    nothing)."""
    optimizer = ds["optimizer"]
    params = optimizer.setdefault("params", {})
    name = optimizer["type"].lower()
    if name in ("adam", "adamw") and params.get("torch_adam"):
        adam_w = name == "adamw" or params.get("adam_w_mode", True)
        optimizer["type"] = "torch.optim.AdamW" if adam_w else "torch.optim.Adam"
        for key in ADAM_EXTRA_KEYS:
            params.pop(key, None)
    elif name in DEEPSPEED_OPTIMIZERS:
        logger.info("deepspeed.zero_optimization.stage 0 -> 1: %s is DeepSpeed's own, and only ZeRO's optimizer "
                    "skips non-finite steps in fp32", optimizer["type"])
        ds.setdefault("zero_optimization", {})["stage"] = 1


def skip_allreduce_over_one_rank(model) -> None:
    """Under stage 0 DeepSpeed all-reduces gradients by flattening them into buffers and copying them back; over
    a single rank that is the identity at the cost of two copies of every gradient per step. (ZeRO's reduction
    also fills its partitions, so it stays.)"""
    if isinstance(model.optimizer, SkipsNonFiniteSteps) and distributed.world_size() == 1:
        model.enable_backward_allreduce = False


def fit_buckets_to_model(ds: dict, trainable_parameters: int) -> None:
    """ZeRO allocates `reduce_bucket_size` elements for its gradient buffer at every micro-step (twice with
    `overlap_comm`; 500M by default: 2 GB in fp32). A bucket larger than all trainable parameters together
    (a small model, a LoRA) holds nothing more: cap it there, which leaves the reduction itself unchanged."""
    zero = ds.setdefault("zero_optimization", {})
    default = 500_000_000  # DeepSpeed's
    if int(zero.get("reduce_bucket_size", default)) > trainable_parameters:
        zero["reduce_bucket_size"] = max(1, trainable_parameters)


def check_optimizer(optimizer: dict) -> None:
    """`deepspeed.optimizer`: a type DeepSpeed knows by name or an importable class path, and, for a class path or
    torch's AdamW, parameters its constructor takes (a misspelt one is an error naming it, not a TypeError)."""
    name = optimizer.get("type")
    if not isinstance(name, str) or not name:
        raise ConfigError("deepspeed.optimizer.type is missing: e.g. AdamW")
    if name.lower() in DEEPSPEED_OPTIMIZERS:
        factory = torch.optim.AdamW if name.lower() in ("adam", "adamw") else None
    elif name in COMPILED_AT_FIRST_USE:
        factory = None  # importing it is fine, but whether it can be built is build_optimizer's question
    elif "." in name:
        factory = get_obj_from_str(name)
    else:
        close = difflib.get_close_matches(name.lower(), sorted(DEEPSPEED_OPTIMIZERS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"deepspeed.optimizer.type={name!r} is neither an optimizer DeepSpeed knows by name nor a "
                          f"class path (module.Name){hint}")
    params = optimizer.get("params") or {}
    lr = params.get("lr")
    if lr is not None:
        check_value("deepspeed.optimizer.params.lr", lr, number_rule(0))
    if factory is not None:
        params = {key: value for key, value in params.items() if key not in ADAM_EXTRA_KEYS}
        check_parameters(factory, params, "deepspeed.optimizer.params")


def set_precision(ds: dict, args) -> None:
    """`args.fp16` / `args.bf16` win over the section and switch the other off; two enabled sections are an error."""
    if args.fp16 and args.bf16:
        raise ConfigError("args.fp16 and args.bf16 are both true: choose one (the family configs set the precision "
                          "each model was trained in: 2B fp16, 5B and 1.5 bf16)")
    for name, other in (("fp16", "bf16"), ("bf16", "fp16")):
        if getattr(args, name):
            ds[name] = {**ds.get(name, {}), "enabled": True}
            ds[other] = {**ds.get(other, {}), "enabled": False}
    for name in DTYPES:
        ds[name] = {**ds.get(name, {}), "enabled": bool(ds.get(name, {}).get("enabled", False))}
    if ds["fp16"]["enabled"] and ds["bf16"]["enabled"]:
        raise ConfigError("deepspeed.fp16.enabled and deepspeed.bf16.enabled are both true: set args.fp16 or args.bf16")


def training_dtype(ds: dict) -> torch.dtype:
    """The dtype the network computes in (and the frozen T5 and VAE are cast to)."""
    return next((dtype for name, dtype in DTYPES.items() if ds[name]["enabled"]), torch.float32)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def choose_adam(params: dict, on_gpu: bool) -> None:
    """torch's AdamW (fused on a GPU) unless DeepSpeed's FusedAdam is prebuilt or asked for with torch_adam: false."""
    if "torch_adam" not in params:
        params["torch_adam"] = not (on_gpu and deepspeed_op_prebuilt("fused_adam"))
    if params["torch_adam"]:
        if on_gpu:
            params.setdefault("fused", True)
    elif on_gpu and not deepspeed_op_prebuilt("fused_adam") and not can_compile_cuda_ops():
        raise ConfigError("deepspeed.optimizer.params.torch_adam=false asks for DeepSpeed's FusedAdam, which is not "
                          "prebuilt here and cannot be compiled (no nvcc/CUDA_HOME or ninja): remove the key to use "
                          "torch's fused AdamW")
    elif not on_gpu:
        raise ConfigError("deepspeed.optimizer.params.torch_adam=false: DeepSpeed's FusedAdam needs a GPU")


def build_optimizer(ds: dict, parameters: list[dict], on_gpu: bool) -> torch.optim.Optimizer | None:
    """A class-path optimizer built here (then removed from `ds`); None for DeepSpeed's own by name."""
    optimizer = ds["optimizer"]
    if optimizer["type"].lower() in DEEPSPEED_OPTIMIZERS:
        return None
    if optimizer["type"] in COMPILED_AT_FIRST_USE:
        if not on_gpu:
            raise ConfigError(f"deepspeed.optimizer.type={optimizer['type']!r} is a fused CUDA optimizer; on the CPU "
                              "use type: AdamW (torch's implementation is used automatically)")
        if not can_compile_cuda_ops():
            raise ConfigError(f"deepspeed.optimizer.type={optimizer['type']!r} compiles a CUDA extension at first use "
                              "and this machine has no nvcc/CUDA_HOME or ninja: use type: AdamW (torch's fused AdamW)")
    ds.pop("optimizer")
    optimizer_class = get_obj_from_str(optimizer["type"])
    if plain_fp32_step(ds):  # the optimizer clips, so that DeepSpeed does not compute the norm a second time
        max_grad_norm = float(ds.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT))
        ds["gradient_clipping"] = 0.0
        optimizer_class = skipping_nonfinite_steps(optimizer_class, max_grad_norm)
    return optimizer_class(parameters, **optimizer.get("params", {}))


def deepspeed_op_prebuilt(name: str) -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(name, False))


def can_compile_cuda_ops() -> bool:
    """nvcc (on PATH or under CUDA_HOME) and ninja: what DeepSpeed and SAT need to build an op at first use."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    return bool(nvcc) and shutil.which("ninja") is not None
