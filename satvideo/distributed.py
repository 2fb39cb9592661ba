"""Process-group set-up shared by training, sampling and model construction."""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist

from satvideo.config import ConfigError


def use_gpu(device: str | None) -> bool:
    """`args.device`: None picks CUDA when available; "cpu" forces the CPU."""
    return torch.cuda.is_available() and device != "cpu"


def init_distributed(backend: str | None = None) -> None:
    """Join the torchrun process group (or a one-process group) and set up SAT's model-parallel groups.

    SwissArmyTransformer's parallel layers ask torch.distributed for the model-parallel world size even in a
    single process, so a one-process gloo group is created when the script was not launched by torchrun.
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_gpu(None) else "gloo")
        if "WORLD_SIZE" in os.environ:  # launched by torchrun
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group(backend=backend)
        else:  # a plain `python` run: a group of one, rendezvous in memory (no port to race for)
            # DeepSpeed insists on LOCAL_RANK; WORLD_SIZE stays unset so that child processes start groups of
            # their own instead of taking the torchrun path.
            os.environ.update(RANK="0", LOCAL_RANK="0")
            if backend == "nccl":
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        if backend == "gloo":
            _skip_deepspeed_shm_kernel()
    from sat import mpu

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)


def _skip_deepspeed_shm_kernel() -> None:
    """On the CPU, DeepSpeed would compile a shared-memory all-reduce kernel (about a minute) when it first
    initialises; gloo does the same job. DeepSpeed keeps its op-compatibility table in one cached dict for
    exactly such edits."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_device(device: str | None) -> torch.device:
    """The one place that decides where a run lives: this rank's device, the process-group backend (nccl or
    gloo) and DeepSpeed's accelerator, which otherwise detects CUDA by itself and would move a CPU run's
    module to the GPU."""
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"args.device={device!r}: expected cpu, cuda or null (cuda when available)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("args.device=cuda: no CUDA device is visible")
    on_gpu = use_gpu(device)
    set_deepspeed_accelerator(on_gpu)
    init_distributed("nccl" if on_gpu else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def set_deepspeed_accelerator(on_gpu: bool) -> None:
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if (get_accelerator().device_name() == "cuda") == on_gpu:
        return
    if on_gpu:
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        set_accelerator(CUDA_Accelerator())
    else:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def peak_memory_gb(device: torch.device, reset: bool = False) -> float:
    """Peak memory of this process: CUDA's peak allocation on `device` (restarted with `reset`), else the peak
    resident set (which never restarts)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
