"""Measuring time and memory the same way for every implementation: alternating repetitions, and peak memory
from the CUDA allocator or, on the CPU, from the tensors a call creates.

On the CPU, resident memory (RSS) says little about one call: the allocator keeps freed pages and the process
holds everything loaded before. `LiveTensorBytes` counts instead the bytes of every tensor storage created while
it is active, until that storage is freed: what a CUDA allocator's peak would show, with weights and inputs
created outside not counted.
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """While active, `live` is the number of bytes held by tensor storages created so far and not yet freed;
    `peak` is its maximum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._finalizers: dict[int, weakref.finalize] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # one StorageImpl, however many views share it
        if key in self._finalizers:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._finalizers[key] = weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self._finalizers.pop(key, None)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of `fn()` above what was allocated before it (its result included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    with LiveTensorBytes() as counter:
        result = fn()
        del result
    return counter.peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)


def time_alternating(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     warmup: int = 1) -> dict[str, Timing]:
    """Wall time of each function, run in turns (a, b, a, b, ...) so that drifts of the machine (other load,
    clock changes) fall on every function alike; `warmup` untimed turns first."""
    timings = {name: Timing([]) for name in functions}
    for turn in range(warmup + repeats):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if turn >= warmup:
                timings[name].seconds.append(time.perf_counter() - start)
    return timings


class OpCounter(TorchDispatchMode):
    """While active, counts the calls of each aten operator (e.g. how many concatenations a forward makes)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object], name: str) -> int:
    """How many times `fn()` calls the aten operator `name` (for example "cat")."""
    with OpCounter() as counter:
        fn()
    return counter.counts.get(name, 0)
