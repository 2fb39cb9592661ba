"""Training a researcher can watch and trust: safe loading, the non-finite guard, the run folder (lock, config,
metrics across resumes, pruning), validation, EMA and LoRA-only checkpoints."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from bad_dataset import make_bad_dataset
from test_training import LAUNCHER_VARIABLES, ROOT, TINY, metrics, run, train

from satvideo import distributed
from satvideo.checkpoint import (MODEL_STATES, load_network, lora_metadata, network_state_dict, read_latest,
                                 safe_load)
from satvideo.config import CheckpointError, ConfigError, TrainingError, args_namespace, load_config
from satvideo.data.toy import make_toy_dataset
from satvideo.data.video import read_mp4
from satvideo.engine import VideoDiffusionEngine
from satvideo.sampling import add_lora_from_checkpoint
from satvideo.training.deepspeed_setup import deepspeed_config
from satvideo.training.ema import EMA
from satvideo.training.guards import NonFiniteGuard, check_training_args
from satvideo.training.loop import build_deepspeed_engine, full_weights_of, resume
from satvideo.training.run_folder import RunLock, check_resumable, prune_checkpoints, truncate_metrics

LORA = ["configs/lora.yaml", "model.network_config.params.modules.lora_config.params.r=4",
        "model.network_config.params.modules.lora_config.params.lora_alpha=8"]
QUICK = ("args.log_interval=1", "args.save_interval=2", "args.batch_size=2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    make_toy_dataset(folder, num=8, size=32, frames=9, fps=8, seed=0)
    return str(folder)


def failing(command: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra_env)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train_command(save, data, *overrides) -> list[str]:
    return [sys.executable, "train_video.py", "--base", *TINY, f"args.save={save}", f"args.train_data=[{data}]",
            "args.num_workers=0", *overrides]


# --- safe loading ------------------------------------------------------------------------------------------

class Planted:
    """Unpickling this creates the marker file: what a planted checkpoint would do with an unrestricted load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, data):
    save = tmp_path_factory.mktemp("clean") / "run"
    train(save, data, "args.train_iters=2", *QUICK, "args.ema_decay=0.5")
    return save


def resume_in_process(save: Path, *overrides):
    config = load_config(TINY, [f"args.save={save}", *overrides])
    args = args_namespace(config)
    device = distributed.init_device("cpu")
    ds = deepspeed_config(config, args, on_gpu=False)
    model, _ = build_deepspeed_engine(config, args, ds, device, load_weights=False)
    ema = EMA(model.module.network, 0.5)
    return resume(model, args, read_latest(save), device, ema, adapters_only=False)


@pytest.mark.parametrize("name", [MODEL_STATES, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt",
                                  "ema_rank0.pt"])
def test_a_planted_pickle_in_any_resume_file_does_not_run(clean_run, tmp_path, name):
    save = tmp_path / "run"
    shutil.copytree(clean_run, save)
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(str(marker))}, save / "2" / name)
    with pytest.raises(CheckpointError, match=rf"{name}: refused to load: not a plain tensor file"):
        resume_in_process(save)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello\n", b"]\x00\x01", b"\x85 not torch"])
def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path, content):
    from satvideo.checkpoint import safe_load

    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"weights.pt: refused to load: not a plain tensor file"):
        safe_load(path)
    with pytest.raises(CheckpointError, match=r"refused to load: a folder, not a file$"):
        safe_load(tmp_path)


def test_a_truncated_checkpoint_is_said_to_be_damaged_not_refused_as_unsafe(tmp_path):
    from satvideo.checkpoint import safe_load

    whole = tmp_path / "whole.pt"
    torch.save({"module": {"weight": torch.ones(1000)}}, whole)
    torch.save({"module": {"weight": torch.ones(1000)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for source, cut in ((whole, 0.5), (whole, 0.99), (tmp_path / "legacy.pt", 0.5)):
        data = source.read_bytes()
        path = tmp_path / "cut.pt"
        path.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(CheckpointError, match=r"cut.pt: cannot be read: the file is damaged or truncated \("):
            safe_load(path)


def test_the_clean_checkpoint_resumes_in_process(clean_run, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(clean_run, save)
    assert resume_in_process(save) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda save: ((save / "latest").unlink(), (save / "latest").mkdir()), "latest should be a file holding an "
                                                                          "iteration number, but is not a file"),
    (lambda save: (save / "latest").write_text("\u00b2"), "latest should hold an iteration number, found '\u00b2'"),
    (lambda save: (save / "2" / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing, so the run cannot resume exactly; "
                                                          "set args.no_load_rng=true to resume with fresh random states"),
])
def test_a_damaged_run_folder_is_refused_not_restarted(clean_run, tmp_path, damage, message):
    save = tmp_path / "run"
    shutil.copytree(clean_run, save)
    damage(save)
    with pytest.raises(CheckpointError) as error:
        resume_in_process(save)
    assert str(error.value).endswith(message)
    if "rng" in message:
        assert resume_in_process(save, "args.no_load_rng=true") == 2


def test_weights_files_that_hold_no_state_dict_are_refused_and_the_older_format_is_read(tmp_path):
    from satvideo.checkpoint import lora_metadata, network_state_dict
    from satvideo.vae.autoencoder import load_vae_state_dict

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match=r"tensor.pt: not a checkpoint \(holds a Tensor, not a dict of weights\)$"):
        network_state_dict(tensor)
    with pytest.raises(CheckpointError, match=r"tensor.pt: not a checkpoint \(holds a Tensor, not a dict of weights\)$"):
        load_vae_state_dict(str(tensor))
    listed = tmp_path / "listed.pt"
    torch.save({"module": {"a.weight": [1, 2]}}, listed)
    with pytest.raises(CheckpointError, match=r"listed.pt: not a checkpoint: entry 'a.weight' of its weights is a list"):
        network_state_dict(listed)
    older = tmp_path / "older.pt"  # torch's format before 1.6, which cannot be memory-mapped
    torch.save({"module": {"a.weight": torch.ones(2)}, "lora": {"r": 4}}, older, _use_new_zipfile_serialization=False)
    assert lora_metadata(older) == {"r": 4} and torch.equal(network_state_dict(older)["a.weight"], torch.ones(2))


def test_a_planted_resume_stops_the_entrypoint_with_one_line(clean_run, tmp_path, data):
    save = tmp_path / "run"
    shutil.copytree(clean_run, save)
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(str(marker))}, save / "2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    result = failing(train_command(save, data, "args.train_iters=3", *QUICK))
    assert result.returncode == 2 and not marker.exists() and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "refused to load" in result.stderr


def test_a_planted_lora_adapter_or_ema_file_is_refused_at_sampling(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt" / "1").mkdir(parents=True)
    torch.save({"module": {"x": Planted(str(marker))}}, tmp_path / "ckpt" / "1" / MODEL_STATES)
    (tmp_path / "ckpt" / "latest").write_text("1")
    network = VideoDiffusionEngine.from_config(load_config(TINY).model).network
    with pytest.raises(CheckpointError, match="refused to load"):
        load_network(network, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="refused to load"):
        lora_metadata(tmp_path / "ckpt")
    assert not marker.exists()


# --- non-finite guard --------------------------------------------------------------------------------------

def test_an_injected_nan_batch_is_skipped_counted_and_the_run_goes_on(tmp_path, data):
    # tests/nan_dataset.py: the toy dataset with NaN pixels in sample 3 (batches of 2: one bad batch per epoch).
    # ZeRO-2's optimizer skips those steps; under stage 0 in fp32 satvideo's optimizer does, with the same result.
    runs = {}
    for stage in (2, 0):
        save = tmp_path / f"stage{stage}"
        output = run(train_command(save, data, "args.train_iters=6", *QUICK, "data.target=nan_dataset.NaNAtSample",
                                   "args.save_interval=6", f"args.zero_stage={stage}"),
                     PYTHONPATH=str(Path(ROOT) / "tests"))
        lines = runs[stage] = metrics(save)
        assert sum(line["nonfinite_losses"] for line in lines) >= 1
        assert sum(line["skipped_steps"] for line in lines) >= 1
        assert read_latest(save) == 6 and "iteration 6 | loss" in output
        assert all(torch.isfinite(value).all() for value in network_state_dict(save).values())
    for ours, zero in zip(runs[0], runs[2], strict=True):
        assert (ours["skipped_steps"], ours["lr"]) == (zero["skipped_steps"], zero["lr"])
        assert ours["loss"] == pytest.approx(zero["loss"], rel=1e-5)
        if not zero["skipped_steps"]:
            assert ours["grad_norm"] == pytest.approx(zero["grad_norm"], rel=1e-5)  # before clipping, in both


class SkippingEngine:
    """Stands in for a DeepSpeed engine whose every step is skipped."""

    def __init__(self, fp16: bool):
        self.skipped_steps, self.fp16 = 0, fp16

    def fp16_enabled(self) -> bool:
        return self.fp16


def test_fp16_loss_scale_overflows_are_counted_but_not_fatal():
    engine = SkippingEngine(fp16=True)
    guard = NonFiniteGuard(engine, max_in_row=3)
    for iteration in range(1, 21):  # the loss scale settling: finite losses, overflowing fp16 gradients
        engine.skipped_steps += 1
        assert guard.after_step(iteration, torch.tensor([0.5, 0.7]))
    assert guard.in_row == 0
    for iteration in range(21, 23):
        engine.skipped_steps += 1
        guard.after_step(iteration, torch.tensor([float("nan"), 0.7]))
    engine.skipped_steps += 1
    with pytest.raises(TrainingError, match="iteration 23: 3 optimizer steps in a row skipped"):
        guard.after_step(23, torch.tensor([float("inf")]))


def test_without_fp16_a_skip_with_a_finite_loss_counts():
    engine = SkippingEngine(fp16=False)
    guard = NonFiniteGuard(engine, max_in_row=2)
    engine.skipped_steps += 1
    guard.after_step(1, torch.tensor([0.5]))
    engine.skipped_steps += 1
    with pytest.raises(TrainingError, match="2 optimizer steps in a row"):
        guard.after_step(2, torch.tensor([0.5]))


def test_a_run_that_is_nan_every_step_stops_and_latest_stays(tmp_path, data):
    save = tmp_path / "run"
    train(save, data, "args.train_iters=2", *QUICK)
    result = failing(train_command(save, data, "args.train_iters=8", *QUICK, "args.save_interval=1",
                                   "model.scale_factor=1e38", "args.max_nonfinite_steps=3"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "3 optimizer steps in a row skipped for non-finite loss" in result.stderr.strip().splitlines()[-1]
    assert read_latest(save) == 2 and sorted(p.name for p in save.iterdir() if p.name.isdigit()) == ["2"]


@pytest.mark.parametrize("override, message", [
    ("args.eval_interval=5", r"args.eval_interval is set but there is nothing to validate"),
    # validation decodes with these: a bad one would otherwise stop the run at its first validation
    ("args.decode_chunk_frames=3", r"^args.decode_chunk_frames must be a positive multiple of 2, got 3$"),
    ("args.vae_tiling=4", r"^args.vae_tiling=4 with args.vae_tile_overlap=8: need whole numbers, the tile larger"),
    ("args.eval_interval=5 args.validation_prompts=[a] args.save=null",
     r"^args.validation_prompts: validation videos are written under args.save; set it$"),
])
def test_validation_and_decoding_options_are_checked_first(override, message):
    with pytest.raises(ConfigError, match=message):
        check_training_args(args_namespace(load_config(TINY, override.split())))


def start_in_process(save: Path, data: Path, *overrides: str) -> None:
    """train_video.py's train() in this process (the caller is in the repository root)."""
    from satvideo.training import loop

    files = [item for item in overrides if item.endswith(".yaml")]
    settings = [item for item in overrides if not item.endswith(".yaml")]
    loop.train(load_config([*TINY, *files], [f"args.save={save}", f"args.train_data=[{data}]", "args.num_workers=0",
                                             *settings]))


def test_a_start_that_fails_its_checks_leaves_the_run_folder_as_it_was(tmp_path, data, monkeypatch):
    from satvideo.config import CheckpointNotFound

    monkeypatch.chdir(ROOT)

    def start(save, *overrides) -> None:
        start_in_process(save, data, *overrides)

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "training_config.yaml").write_text("the earlier run's\n")
    bad_only = make_bad_dataset(tmp_path / "bad_only", good=1)  # then without its one good clip: nothing to use
    (bad_only / "videos" / "00000.mp4").unlink()
    (bad_only / "labels" / "00000.txt").unlink()
    for save in (earlier, tmp_path / "new"):
        with pytest.raises(ConfigError, match=r"args.train_data .*no_data"):
            start(save, f"args.train_data=[{tmp_path / 'no_data'}]")
        with pytest.raises(ConfigError, match=r"^deepspeed.optimizer.params.lr=-1: expected a number >= 0$"):
            start(save, "deepspeed.optimizer.params.lr=-1")
        with pytest.raises(ConfigError, match=r"lora_config: LoRA adapters train over a base model; give .* args.load"):
            start(save, "configs/lora.yaml")
        with pytest.raises(ConfigError, match=r"^args.validation_prompts: request 0 \('a red square'\): image "
                                              r"missing.png cannot be read"):
            start(save, "args.eval_interval=2", "args.validation_prompts=[a red square@@missing.png]",
                  "model.noised_image_input=true")
        with pytest.raises(ConfigError, match=r"^args.valid_data: \d+ samples in a row cannot be used"):
            start(save, "args.eval_interval=2", f"args.valid_data=[{bad_only}]")
        with pytest.raises(ConfigError, match=r"^args.validation_prompts=.*comments.txt: holds no prompt$"):
            (tmp_path / "comments.txt").write_text("# nothing to sample\n\n")
            start(save, "args.eval_interval=2", f"args.validation_prompts={tmp_path / 'comments.txt'}")
    assert (earlier / "training_config.yaml").read_text() == "the earlier run's\n"
    assert not (tmp_path / "new").exists()  # a folder the failed start created is gone again

    (earlier / "latest").write_text("5")
    with pytest.raises(CheckpointNotFound, match=r"earlier/latest names iteration 5, but .*earlier/5/mp_rank_00"):
        start(earlier)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"^args.save=.*a_file: cannot be the run folder"):
        start(tmp_path / "a_file")


def test_a_run_resumes_only_as_it_was_trained_and_a_finished_one_is_left_alone(tmp_path, clean_run, data,
                                                                                 monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    save = tmp_path / "run"
    shutil.copytree(clean_run, save)
    before = {path.name: path.stat().st_mtime_ns for path in save.iterdir() if path.name != ".run.lock.guard"}
    as_trained = ("args.train_iters=4", *QUICK, "args.ema_decay=0.5")
    for change, message in (("args.zero_stage=3", r"the ZeRO stage \(args.zero_stage\) = 2, this config has 3"),
                            ("args.batch_size=1", r"the micro-batch \(args.batch_size\) = 2, this config has 1"),
                            ("configs/lora.yaml", r"model.network_config.params.modules.lora_config = None, this config "
                                                  r"has \{'target'"),
                            ("model.network_config.params.num_layers=3", r"model.network_config.params.num_layers = 2, this "
                                                                           r"config has 3")):
        with pytest.raises(ConfigError, match=rf"^args.save={save} holds a run trained with {message}"):
            start_in_process(save, data, *as_trained, change, f"args.load={clean_run}")
    two_ranks = tmp_path / "two_ranks"
    shutil.copytree(clean_run, two_ranks)
    shutil.copy(two_ranks / "2" / "rng_rank0.pt", two_ranks / "2" / "rng_rank1.pt")  # as a 2-rank run leaves it
    with pytest.raises(ConfigError, match=rf"^args.save={two_ranks} holds a run of 2 ranks, this job has 1: its "
                                          r"optimizer and EMA shards, RNG states and data order are per rank, so it "
                                          rf"resumes on 2 ranks only \(or start a new args.save with "
                                          rf"args.load={two_ranks}\)$"):
        start_in_process(two_ranks, data, *as_trained)
    saved = load_config([save / "training_config.yaml"])
    two_way = load_config([save / "training_config.yaml"], ["args.sequence_parallel_size=2"])
    ds = deepspeed_config(saved, args_namespace(saved), on_gpu=False)
    check_resumable(save, saved, ds, False, iteration=2, world_size=1)
    with pytest.raises(ConfigError, match=rf"^args.save={save} holds a run trained with args.sequence_parallel_size = "
                                          "1, this config has 2"):
        check_resumable(save, two_way, ds, False, iteration=2, world_size=1)
    start_in_process(save, data, *as_trained[1:], "args.train_iters=2")  # finished: nothing to train, no error
    assert "is at iteration 2 already, args.train_iters=2: nothing to train" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in save.iterdir() if path.name != ".run.lock.guard"} == before


def test_a_failing_validation_costs_no_checkpoint(tmp_path, data, monkeypatch):
    from satvideo.training.validation import Validator

    def broken(self, engine, iteration, out_dir, ema=None):
        raise RuntimeError("validation broke")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(Validator, "__call__", broken)
    save = tmp_path / "run"
    with pytest.raises(RuntimeError, match="validation broke"):
        start_in_process(save, data, "args.train_iters=2", *QUICK, "args.eval_interval=2", f"args.valid_data=[{data}]")
    assert read_latest(save) == 2


def test_a_worker_whose_launcher_is_gone_stops(monkeypatch):
    from satvideo.training.guards import LauncherWatch

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(os, "getppid", lambda: 4321)
    watch = LauncherWatch()
    watch.check(1)
    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented to init: torchrun was killed
    with pytest.raises(TrainingError, match=r"iteration 2: the torchrun launcher \(pid 4321\) is gone"):
        watch.check(2)


# --- run folder --------------------------------------------------------------------------------------------

def test_config_is_saved_and_metrics_hold_each_iteration_once_after_a_resume(tmp_path, data):
    save = tmp_path / "run"
    train(save, data, "args.train_iters=4", *QUICK)
    assert load_config([str(save / "training_config.yaml")]).args.train_iters == 4
    # as if killed after logging iterations 3 and 4 but before the save of 4 became `latest`
    (save / "latest").write_text("2")
    shutil.rmtree(save / "4")
    train(save, data, "args.train_iters=6", *QUICK)
    assert [line["iteration"] for line in metrics(save)] == [1, 2, 3, 4, 5, 6]


def test_truncate_metrics_drops_lines_after_the_resumed_iteration_and_cut_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3}\n{"itera')
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1}\n{"iteration": 2}\n'


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder: Path, host: str, pid: int, age: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.lock").write_text(f'{{"host": "{host}", "pid": {pid}, "start": "then"}}')
    then = time.time() - age
    os.utime(folder / "run.lock", (then, then))


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    here = socket.gethostname()
    write_lock(tmp_path, here, os.getpid())  # this very process: alive
    with pytest.raises(TrainingError, match=rf"args.save={tmp_path} is in use by a live run \(host {here}, pid"):
        RunLock(tmp_path, timeout=900).acquire()
    write_lock(tmp_path, "elsewhere", 1, age=10)  # another host, fresh heartbeat
    with pytest.raises(TrainingError, match="in use by a live run"):
        RunLock(tmp_path, timeout=900).acquire()
    for host, pid, age in ((here, dead_pid(), 0), ("elsewhere", 1, 1000)):  # process gone; heartbeat too old
        write_lock(tmp_path, host, pid, age)
        lock = RunLock(tmp_path, timeout=900)
        lock.acquire()
        assert lock.holder() == lock.record
        lock.release()
        assert not (tmp_path / "run.lock").exists()


def test_racing_starters_on_a_stale_lock_leave_exactly_one_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, socket.gethostname(), dead_pid())
    outcomes, start = [], threading.Barrier(6)

    def starter():
        start.wait()
        try:
            RunLock(tmp_path, timeout=900).acquire()
            outcomes.append("acquired")
        except TrainingError:
            outcomes.append("refused")

    threads = [threading.Thread(target=starter) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["acquired"] + ["refused"] * 5


def test_the_lock_heartbeat_runs_between_log_lines(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path, timeout=2)  # a beat every second
    lock.acquire()
    then = time.time() - 100
    os.utime(tmp_path / "run.lock", (then, then))
    time.sleep(1.6)
    assert time.time() - (tmp_path / "run.lock").stat().st_mtime < 1.5
    lock.release()


def test_the_same_slurm_job_takes_its_lock_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "run.lock").write_text('{"host": "node7", "pid": 1, "start": "then", "slurm_job": "4242"}')
    RunLock(tmp_path, timeout=900).acquire()


def test_the_entrypoint_refuses_a_locked_folder(tmp_path, data):
    write_lock(tmp_path / "run", socket.gethostname(), os.getpid())
    result = failing(train_command(tmp_path / "run", data, "args.train_iters=2"))
    assert result.returncode == 2 and "is in use by a live run" in result.stderr.strip().splitlines()[-1]


def test_keep_last_prunes_old_checkpoints_and_their_ema(tmp_path):
    for name in ("2", "2-ema", "4", "4-ema", "6", "6-ema", "validation"):
        (tmp_path / name).mkdir()
    prune_checkpoints(tmp_path, keep_last=2, latest=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "4-ema", "6", "6-ema", "validation"]


# --- validation --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_rank_validation_writes_loss_lines_and_videos_that_decode(tmp_path, data):
    save = tmp_path / "run"
    prompts = "[a red square moving left,a blue circle moving up,a green square moving down]"
    train(save, data, "args.train_iters=4", "args.log_interval=2", "args.save_interval=4", "args.batch_size=2",
          "args.eval_interval=2", f"args.valid_data=[{data}]", "args.eval_iters=2", "args.eval_batch_size=1",
          f"args.validation_prompts={prompts}", "model.sampler_config.params.num_steps=2",
          "model.sampler_config.params.guider_config.params.num_steps=2", "args.ema_decay=0.5",
          "args.validate_ema=true", nproc=2)
    valid = [line for line in metrics(save) if "valid_loss" in line]
    assert [line["iteration"] for line in valid] == [2, 4] and all(line["valid_loss"] > 0 for line in valid)
    # the average (owned by one rank per weight, broadcast to the other) differs from the trained weights
    assert all(0 < line["valid_loss_ema"] != line["valid_loss"] for line in valid)
    for iteration in (2, 4):
        videos = sorted((save / "validation" / f"{iteration:07d}").glob("*.mp4"))
        assert [video.name[:2] for video in videos] == ["00", "01", "02"]  # three prompts over two ranks
        frames, fps = read_mp4(videos[0])
        assert frames.shape == (9, 32, 32, 3) and round(fps) == 8


def test_a_run_stopped_between_a_checkpoint_and_its_validation_validates_when_it_resumes(tmp_path, data):
    validation = ("args.eval_interval=2", f"args.valid_data=[{data}]", "args.lr_decay_iters=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, data, "args.train_iters=4", *QUICK, *validation)
    train(resumed, data, "args.train_iters=2", *QUICK, *validation)
    kept = [line for line in metrics(resumed) if "valid_loss" not in line]  # as if killed while validating
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in kept))
    train(resumed, data, "args.train_iters=4", *QUICK, *validation)
    timing = ("step_time", "samples_per_s", "peak_memory_gb")
    logged = [[{key: value for key, value in line.items() if key not in timing} for line in metrics(run)]
              for run in (straight, resumed)]
    assert [line["iteration"] for line in logged[0] if "valid_loss" in line] == [2, 4] and logged[1] == logged[0]


def test_ema_swapped_in_holds_the_average_and_gives_the_trained_weights_back_bit_for_bit():
    network = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    network[1].weight.requires_grad_(False)  # frozen: not averaged, not touched
    ema = EMA(network, 0.5)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) / 3)
    ema.update()
    trained = {name: value.clone() for name, value in network.state_dict().items()}
    with ema.swapped_in():
        for name, value in network.state_dict().items():
            expected = ema.average.get(name, trained[name])
            assert torch.equal(value, expected) and (name not in ema.average or not torch.equal(value, trained[name]))
    for name, value in network.state_dict().items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.parametrize("overrides", [[], ["args.eval_interval=2", "args.valid_data=[x]"],
                                       ["args.ema_decay=0.9", "args.validation_prompts=[a]", "args.save=x"]])
def test_validate_ema_needs_an_average_and_validation(overrides):
    args = args_namespace(load_config(TINY, ["args.validate_ema=true", *overrides]))
    with pytest.raises(ConfigError, match="args.validate_ema: validating the EMA weights needs args.ema_decay and "
                                          "args.eval_interval"):
        check_training_args(args)


@pytest.mark.parametrize("overrides, drawn", [(["args.eval_iters=3", "args.eval_batch_size=3"], "draws 9"),
                                               (["args.eval_iters=8"], None),
                                               (["args.eval_iters=3", "args.eval_batch_size=3",
                                                 "data.params.buckets=[[9,32,32]]"], None),  # 3 batches of 8
                                               (["args.eval_iters=4", "args.eval_batch_size=3",
                                                 "data.params.buckets=[[9,32,32]]"], "draws 4")])
def test_a_validation_set_smaller_than_one_evaluation_is_named(data, caplog, overrides, drawn):
    from satvideo.training.validation import Validator

    config = load_config(TINY, [f"args.valid_data=[{data}]", "args.eval_interval=1", *overrides])
    with caplog.at_level("WARNING", logger="satvideo.train"):
        Validator(config, args_namespace(config), torch.device("cpu"))
    warnings = [record.getMessage() for record in caplog.records if "count more than once" in record.getMessage()]
    assert [drawn in message for message in warnings] == ([True] if drawn else [])


def test_validation_loss_is_the_same_at_every_evaluation_of_the_same_weights(tmp_path, data):
    from satvideo.training.validation import Validator

    config = load_config(TINY, [f"args.valid_data=[{data}]", "args.eval_iters=2", "args.eval_interval=1"])
    args = args_namespace(config)
    engine = VideoDiffusionEngine.from_config(config.model)
    validator = Validator(config, args, torch.device("cpu"))
    first, _ = validator(engine, 1, None)
    torch.rand(5)  # the global RNG moves on between evaluations
    second, _ = validator(engine, 2, None)
    assert first["valid_loss"] == second["valid_loss"]


# --- EMA and LoRA: exact resume, adapter-only checkpoints, sampling -------------------------------------------

def straight_and_resumed(tmp_path, data, *overrides, nproc: int = 1, straight_only: tuple[str, ...] = ()):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = ("args.lr_decay_iters=4", *overrides)  # the same schedule whatever train_iters says
    train(straight, data, "args.train_iters=4", *QUICK, *overrides, *straight_only, nproc=nproc)
    train(resumed, data, "args.train_iters=2", *QUICK, *overrides, nproc=nproc)
    assert "resumed from" in train(resumed, data, "args.train_iters=4", *QUICK, *overrides, nproc=nproc)
    return straight, resumed


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = network_state_dict(a), network_state_dict(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.slow
def test_zero3_full_run_writes_sat_layout_resumes_bit_exactly_with_ema_and_validates_its_average(tmp_path, data):
    validation = ("args.eval_interval=2", f"args.valid_data=[{data}]", "args.eval_iters=2")
    straight, resumed = straight_and_resumed(tmp_path, data, "args.zero_stage=3", "args.ema_decay=0.9",
                                             straight_only=(*validation, "args.validate_ema=true"), nproc=2)
    # the SAT-layout file holds the full weights gathered from both ranks' partitions, as DeepSpeed's own tool
    # consolidates them from the ZeRO files
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from satvideo.config import instantiate_from_config, to_plain

    network = instantiate_from_config(to_plain(load_config(TINY[:1]).model.network_config))
    load_network(network, resumed / "2")  # strict: every key present with its full shape
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(resumed), tag="2")
    sat_layout = network_state_dict(resumed / "2")
    assert {key.removeprefix("model.diffusion_model.") for key in consolidated} == set(sat_layout)
    for key, value in consolidated.items():
        assert torch.equal(value, sat_layout[key.removeprefix("model.diffusion_model.")].float()), key
    # the run that swapped its average in for validation twice (gathered from and given back to both ranks'
    # partitions) trained as the one that never validated
    assert_same_weights(straight, resumed)
    assert_same_weights(straight / "4-ema" / MODEL_STATES, resumed / "4-ema" / MODEL_STATES)
    ema = network_state_dict(straight / "4-ema" / MODEL_STATES)
    weights = network_state_dict(straight)
    assert ema.keys() == weights.keys() and any(not torch.equal(ema[k], weights[k]) for k in ema)

    from satvideo.training.validation import Validator

    logged = [line for line in metrics(straight) if "valid_loss" in line][-1]
    config = load_config(TINY, [*validation, "args.lr_decay_iters=4", "args.eval_iters=4"])  # both ranks' batches
    args = args_namespace(config)
    for use_ema, key in ((False, "valid_loss"), (True, "valid_loss_ema")):  # the saved weights, measured afresh
        torch.manual_seed(args.seed)  # the frozen VAE and text encoder the run built
        engine = VideoDiffusionEngine.for_training(config, args)
        load_network(engine.network, straight, use_ema=use_ema)
        record, _ = Validator(config, args, torch.device("cpu"))(engine, 4, None)
        assert logged["iteration"] == 4 and record["valid_loss"] == pytest.approx(logged[key], rel=1e-5), key


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, data):
    save = tmp_path_factory.mktemp("base") / "run"
    train(save, data, "args.train_iters=2", *QUICK)
    return save


def lora_resumes_with_adapters_only(tmp_path, data, base_checkpoint, *overrides) -> tuple[Path, Path]:
    """A LoRA run straight and resumed; both hold only adapter tensors and end bit-identical."""
    straight, resumed = straight_and_resumed(tmp_path, data, *LORA, f"args.load={base_checkpoint}", *overrides)
    adapters = network_state_dict(straight)
    assert adapters and all("matrix_A" in key or "matrix_B" in key for key in adapters)
    assert_same_weights(straight, resumed)
    return straight, resumed


@pytest.mark.slow
def test_lora_run_saves_only_adapters_and_resumes_bit_exactly_with_ema(tmp_path, data, base_checkpoint):
    straight, resumed = lora_resumes_with_adapters_only(tmp_path, data, base_checkpoint, "args.ema_decay=0.9")
    assert_same_weights(straight / "4-ema" / MODEL_STATES, resumed / "4-ema" / MODEL_STATES)
    metadata = lora_metadata(straight)
    # the base is the model-states file the run started from, not the run folder, whose `latest` moves on; a LoRA
    # run that starts from this one records the same full weights
    base_file = str((base_checkpoint / "2" / MODEL_STATES).resolve())
    assert (metadata["r"], metadata["lora_alpha"]) == (4, 8.0) and metadata["base"] == base_file
    assert full_weights_of(str(straight)) == base_file
    adapter_size = (straight / "4" / MODEL_STATES).stat().st_size
    full_size = (base_checkpoint / "2" / MODEL_STATES).stat().st_size
    print(f"LoRA checkpoint: {adapter_size} bytes, full: {full_size} bytes ({adapter_size / full_size:.1%})")
    assert adapter_size < 0.25 * full_size


@pytest.mark.slow
def test_lora_run_under_zero3_saves_only_adapters_and_resumes_bit_exactly(tmp_path, data, base_checkpoint):
    lora_resumes_with_adapters_only(tmp_path, data, base_checkpoint, "args.zero_stage=3")


def sample_latents(engine: VideoDiffusionEngine) -> torch.Tensor:
    engine.sampler.num_steps = engine.sampler.guider.num_steps = 3
    return engine.sample(["a red square moving left"], (3, 16, 4, 4), torch.Generator().manual_seed(11))


@pytest.mark.slow
def test_adapter_over_base_samples_as_the_merged_model_and_exports_without_alpha(tmp_path, data, base_checkpoint):
    lora_run = tmp_path / "lora"
    train(lora_run, data, "args.train_iters=2", *QUICK, *LORA, f"args.load={base_checkpoint}",
          "model.network_config.params.modules.lora_config.params.lora_alpha=3")
    config = load_config(TINY)  # no LoRA overlay: the adapter checkpoint brings rank and alpha
    overlaid = load_config([*TINY, "configs/lora.yaml"], ["model.network_config.params.modules.lora_config.params.r=4"])
    add_lora_from_checkpoint(overlaid, str(lora_run))  # an overlay's default alpha gives way to the recorded one
    assert overlaid.model.network_config.params.modules.lora_config.params.lora_alpha == 3
    add_lora_from_checkpoint(config, str(lora_run))
    over_base = VideoDiffusionEngine.from_config(config.model)
    load_network(over_base.network, lora_run)  # the base recorded in the checkpoint
    expected = sample_latents(over_base)

    over_base.network.mixins.lora.merge_lora()  # SAT folds B @ A * scale into the projections
    merged_dir = tmp_path / "merged" / "1"
    merged_dir.mkdir(parents=True)
    torch.save({"module": over_base.state_dict()}, merged_dir / MODEL_STATES)
    merged = VideoDiffusionEngine.from_config(load_config(TINY).model)
    load_network(merged.network, merged_dir / MODEL_STATES)
    got = sample_latents(merged)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    half = VideoDiffusionEngine.from_config(config.model)
    load_network(half.network, lora_run, lora_scale=0.0)  # scale 0: the base model alone
    base_only = VideoDiffusionEngine.from_config(load_config(TINY).model)
    load_network(base_only.network, base_checkpoint)
    assert torch.allclose(sample_latents(half), sample_latents(base_only), atol=1e-6)

    run([sys.executable, "scripts/convert_weights.py", "lora-to-diffusers", "--checkpoint", str(lora_run),
         "--out", str(tmp_path / "peft")])
    from safetensors.torch import load_file

    from satvideo.convert.lora import sat_lora_to_peft

    exported = load_file(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    explicit = sat_lora_to_peft(network_state_dict(lora_run), lora_alpha=3.0)
    assert exported.keys() == explicit.keys() and all(torch.equal(exported[k], explicit[k]) for k in exported)


def test_use_ema_without_ema_weights_is_a_clear_error(clean_run, tmp_path):
    network = VideoDiffusionEngine.from_config(load_config(TINY).model).network
    load_network(network, clean_run, use_ema=True)  # the clean run has them
    plain = tmp_path / "plain"
    shutil.copytree(clean_run, plain)
    shutil.rmtree(plain / "2-ema")
    with pytest.raises(CheckpointError, match=r"args.use_ema: .* has no EMA weights"):
        load_network(network, plain, use_ema=True)


def test_rng_state_file_is_plain_tensors(clean_run):
    state = safe_load(clean_run / "2" / "rng_rank0.pt")
    assert set(state) == {"python", "numpy", "torch"}


def test_the_log_window_counts_padded_clips_and_frames():
    from satvideo.data.health import REASONS
    from satvideo.training.metrics import Window

    window = Window(torch.device("cpu"))
    window.add_micro_batch(torch.tensor(0.5), torch.tensor([0, 3]), torch.zeros(2, len(REASONS)))
    window.add_micro_batch(torch.tensor(float("nan")), torch.tensor([2, 0]), torch.zeros(2, len(REASONS)))
    totals = window.totals()
    assert (totals["padded_clips"], totals["padded_frames"]) == (2, 5)
    assert (totals["finite_losses"], totals["nonfinite_losses"], totals["loss_sum"]) == (1, 1, 0.5)
