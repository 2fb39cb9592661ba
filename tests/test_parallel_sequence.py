"""Sequence parallelism: the tiny transformer of every family split over 2 and 4 ranks (gloo) equals one rank,
outputs and gradients, with video tokens that split unevenly."""

import json
import subprocess
import sys

import pytest
import torch

from satvideo.parallel.sequence import split_sizes
from test_training import metrics, run, toy_data, train  # noqa: F401 (toy_data is a fixture)


def test_split_sizes_are_contiguous_and_cover_every_token():
    assert split_sizes(30, 4) == [8, 8, 7, 7] and split_sizes(48, 2) == [24, 24]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_sequence_parallel_transformer_equals_one_rank(tmp_path, ranks):
    out = tmp_path / "errors.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
         "tests/parallel_sp_worker.py", str(out)], PYTHONPATH="tests")
    errors = json.loads(out.read_text())
    assert set(errors) == {"2b", "5b", "5b_i2v", "1.5_5b", "1.5_5b_i2v", "5b, activation checkpointing"}
    for family, error in errors.items():
        assert error["output"] < 1e-5 and error["grads"] < 1e-5, (family, error)


def interrupted_and_resumed(tmp_path, data, *overrides, nproc: int) -> None:
    """A run to 6 resumed from its iteration-4 checkpoint ends bit-identical to an uninterrupted one."""
    from satvideo.checkpoint import network_state_dict, write_latest

    common = ("args.train_iters=6", "args.log_interval=1", "args.save_interval=2", "args.batch_size=2", *overrides)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(str(straight), data, *common, nproc=nproc)
    train(str(resumed), data, *common, nproc=nproc)
    subprocess.run(["rm", "-rf", str(resumed / "6")], check=True)
    write_latest(str(resumed), 4)
    output = train(str(resumed), data, *common, nproc=nproc)
    assert "at iteration 4" in output
    expected, got = network_state_dict(str(straight)), network_state_dict(str(resumed))
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(resumed)]


@pytest.mark.slow
def test_sequence_parallel_training_equals_one_rank_and_resumes_exactly(tmp_path, toy_data):
    one = tmp_path / "one"
    train(str(one), toy_data, "args.train_iters=6", "args.log_interval=1", "args.batch_size=2")
    interrupted_and_resumed(tmp_path, toy_data, "args.sequence_parallel_size=2", nproc=2)
    # the same samples, noise and (summed over the group) gradients as one rank: the same losses
    losses_one = [r["loss"] for r in metrics(one)]
    losses_sp = [r["loss"] for r in metrics(tmp_path / "straight")]
    assert losses_sp == pytest.approx(losses_one, rel=1e-4)
    assert [r["samples"] for r in metrics(tmp_path / "straight")] == [2] * 6  # counted once per group


@pytest.mark.slow
def test_two_by_two_data_and_sequence_parallel_run_resumes_exactly(tmp_path, toy_data):
    interrupted_and_resumed(tmp_path, toy_data, "args.sequence_parallel_size=2", nproc=4)
    assert [r["samples"] for r in metrics(tmp_path / "straight")] == [4] * 6
