"""The run folder `args.save`: one live run at a time (a lock with host, pid and start time, kept fresh by a
heartbeat thread), the merged config beside the checkpoints, metrics that stay one line per iteration across resumes,
and at most `args.keep_last` checkpoints. Only rank 0 touches these files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from satvideo.atomic_files import write_text_atomically
from satvideo.config import ConfigError, TrainingError, args_namespace, is_number, load_config, to_plain
from satvideo.training.deepspeed_setup import deepspeed_config, zero_stage

LOCK = "run.lock"
LOCK_GUARD = ".run.lock.guard"
CONFIG = "training_config.yaml"
METRICS = "metrics.jsonl"
RNG_STATE = "rng_rank{rank}.pt"  # one per rank in each iteration folder

logger = logging.getLogger(__name__)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """`{save}/run.lock`: refused while another live run holds it; taken over once that run is gone (same host:
    its process has exited; another host: no heartbeat for `timeout` seconds; the same Slurm job id: a requeued
    job replacing itself)."""

    def __init__(self, folder: Path, timeout: float):
        self.path = folder / LOCK
        self.timeout = timeout
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self._stop = threading.Event()
        self.created_folder = False

    def acquire(self) -> None:
        """Take the lock, or TrainingError naming the live run that holds it; then keep it fresh in the background."""
        folder = self.path.parent
        self.created_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"args.save={folder}: cannot be the run folder ({error.strerror})") from error
        with self.takeover_guard():  # two starters must not both judge the same lock stale and both run
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and self.is_live(holder):
                    raise TrainingError(
                        f"args.save={self.path.parent} is in use by a live run (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, started {holder.get('start')}); stop it or choose another folder")
                logger.warning("taking over the stale lock %s (%s)", self.path, holder)
                self.path.unlink(missing_ok=True)
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(descriptor, "w") as file:
                json.dump(self.record, file)
        threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()

    @contextmanager
    def takeover_guard(self) -> Iterator[None]:
        """An exclusive advisory lock on a guard file beside the run lock for the check-and-replace."""
        with open(self.path.parent / LOCK_GUARD, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def _beat(self) -> None:
        # A thread, not the training loop: a long validation or log interval must not look like a dead run.
        while not self._stop.wait(max(1.0, self.timeout / 4)):
            self.heartbeat()

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: stale

    def is_live(self, holder: dict) -> bool:
        if self.record["slurm_job"] and holder.get("slurm_job") == self.record["slurm_job"]:
            return False  # this job, requeued: its earlier run is over
        if holder.get("host") == self.record["host"]:
            return process_alive(int(holder.get("pid", -1)))
        try:
            return time.time() - self.path.stat().st_mtime < self.timeout
        except OSError:
            return False

    def heartbeat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        """Give the lock up; a run folder this start created and left without a file of its own goes too."""
        self._stop.set()
        if self.holder() == self.record:
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                (self.path.parent / LOCK_GUARD).unlink(missing_ok=True)
                self.path.parent.rmdir()  # only when empty: a run that wrote anything keeps its folder
            except OSError:
                pass


def save_config(folder: Path, config: DictConfig) -> None:
    """The merged config of the run, as the original writes it: `{save}/training_config.yaml`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / CONFIG, OmegaConf.to_yaml(config, resolve=True))


# Network settings a resume may change: they decide how the same weights are computed, not what they are.
RESUMABLE_NETWORK_CHANGES = ("checkpoint_activations", "checkpoint_num_layers")


def check_resumable(folder: Path, config: DictConfig, ds: dict, on_gpu: bool, iteration: int, world_size: int) -> None:
    """The checkpoints in `folder` continue only on the number of ranks that wrote `iteration` (one RNG state each)
    and under the ZeRO stage, micro-batch, gradient accumulation, sequence parallelism and network (LoRA included)
    they were written with, as the config saved beside them says: a one-line ConfigError naming what changed (not a
    traceback from DeepSpeed's loader, nor a data position silently shifted)."""
    saved_ranks = len(list((folder / str(iteration)).glob(RNG_STATE.format(rank="*"))))
    if saved_ranks and saved_ranks != world_size:
        raise ConfigError(f"args.save={folder} holds a run of {saved_ranks} ranks, this job has {world_size}: its "
                          "optimizer and EMA shards, RNG states and data order are per rank, so it resumes on "
                          f"{saved_ranks} ranks only (or start a new args.save with args.load={folder})")
    saved_file = folder / CONFIG
    if not saved_file.is_file():
        return
    try:
        saved = load_config([saved_file])
        saved_args = args_namespace(saved)
        saved_ds = deepspeed_config(saved, saved_args, on_gpu)
    except ConfigError as error:
        logger.warning("not comparing with %s, which this version cannot read (%s)", saved_file, error)
        return
    changes = [("the ZeRO stage (args.zero_stage)", zero_stage(saved_ds), zero_stage(ds)),
               ("the micro-batch (args.batch_size)", saved_ds["train_micro_batch_size_per_gpu"],
                ds["train_micro_batch_size_per_gpu"]),
               ("deepspeed.gradient_accumulation_steps", saved_ds["gradient_accumulation_steps"],
                ds["gradient_accumulation_steps"]),
               ("args.sequence_parallel_size", saved_args.sequence_parallel_size,
                args_namespace(config).sequence_parallel_size)]
    network = first_difference(to_plain(saved.model.network_config), to_plain(config.model.network_config),
                               "model.network_config")
    if network is not None:
        changes.append(network)
    for what, before, now in changes:
        if before != now:
            raise ConfigError(f"args.save={folder} holds a run trained with {what} = {before!r}, this config has "
                              f"{now!r}: it resumes only as it was (or start a new args.save with args.load={folder})")


def first_difference(before: object, now: object, path: str) -> tuple[str, object, object] | None:
    """(key path, old value, new value) of the first difference between two plain configs, skipping
    RESUMABLE_NETWORK_CHANGES; None when they agree."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in sorted(set(before) | set(now), key=str):
            if key in RESUMABLE_NETWORK_CHANGES:
                continue
            found = first_difference(before.get(key), now.get(key), f"{path}.{key}")
            if found is not None:
                return found
        return None
    return None if before == now else (path, before, now)


def metrics_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(line, record) of each whole record in a metrics.jsonl; a line cut by a kill is passed over."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and is_number(record.get("iteration")):
            yield line, record


def truncate_metrics(folder: Path, iteration: int) -> None:
    """Drop the metrics lines after `iteration` (logged after the checkpoint a resumed run starts from)."""
    path = folder / METRICS
    if path.is_file():
        kept = [line for line, record in metrics_records(path) if record["iteration"] <= iteration]
        write_text_atomically(path, "".join(line + "\n" for line in kept))


def validation_logged(folder: Path, iteration: int) -> bool:
    """Whether metrics.jsonl holds the validation record of `iteration` (one without a training `loss`)."""
    return any(record["iteration"] == iteration and "loss" not in record
               for _, record in metrics_records(folder / METRICS))


def prune_checkpoints(folder: Path, keep_last: int | None, latest: int) -> None:
    """Remove all but the newest `keep_last` iteration folders (and their `-ema` folders); never `latest`."""
    if not keep_last:
        return
    iterations = sorted(int(path.name) for path in folder.iterdir() if path.is_dir() and path.name.isdigit())
    for iteration in iterations[:-keep_last]:
        if iteration == latest:
            continue
        for name in (str(iteration), f"{iteration}-ema"):
            shutil.rmtree(folder / name, ignore_errors=True)
