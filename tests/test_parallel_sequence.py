"""Sequence parallelism: the tiny transformer of every family split over 2 and 4 ranks (gloo) equals one rank,
outputs and gradients, with video tokens that split unevenly."""

import json
import re
import sys

import pytest
import torch

from satvideo.parallel.sequence import split_sizes
from test_training import interrupted_and_resumed, metrics, run, toy_data, train  # noqa: F401 (fixture)


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


@pytest.mark.slow
def test_sequence_parallel_training_equals_one_rank_and_resumes_exactly(tmp_path, toy_data):
    one = tmp_path / "one"
    train(str(one), toy_data, "args.train_iters=6", "args.log_interval=1", "args.batch_size=2")
    save = interrupted_and_resumed(tmp_path, toy_data, "args.sequence_parallel_size=2", nproc=2)
    # the same samples, noise and (summed over the group) gradients as one rank: the same losses
    losses_one = [r["loss"] for r in metrics(one)]
    assert [r["loss"] for r in metrics(save)] == pytest.approx(losses_one, rel=1e-4)
    assert [r["samples"] for r in metrics(save)] == [2] * 6  # counted once per group


@pytest.mark.slow
def test_sequence_parallel_ranks_share_the_chunked_encode_and_train_as_one_rank(tmp_path, toy_data):
    chunked = ("args.train_iters=3", "args.log_interval=1", "args.batch_size=2", "model.encode_chunk_frames=4")
    train(str(tmp_path / "one"), toy_data, *chunked)
    output = train(str(tmp_path / "sp"), toy_data, *chunked, "args.sequence_parallel_size=2", nproc=2)
    # 9 frames in chunks of 5 and 4, one per rank; the posterior draw is the group's first rank's
    assert "the VAE encodes each video's 4-frame chunks over the 2 ranks of its sequence-parallel group" in output
    losses = [[record["loss"] for record in metrics(tmp_path / name)] for name in ("one", "sp")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_two_by_two_data_and_sequence_parallel_run_resumes_exactly(tmp_path, toy_data):
    save = interrupted_and_resumed(tmp_path, toy_data, "args.sequence_parallel_size=2", nproc=4)
    assert [r["samples"] for r in metrics(save)] == [4] * 6


@pytest.mark.slow
def test_sequence_parallel_validation_equals_one_rank(tmp_path, toy_data):
    common = ("args.train_iters=2", "args.log_interval=1", "args.save_interval=2", "args.batch_size=2",
              "args.eval_interval=2", f"args.valid_data=[{toy_data}]", "args.validation_prompts=[a red square moving left]",
              "model.sampler_config.params.num_steps=2", "model.sampler_config.params.guider_config.params.num_steps=2")
    train(str(tmp_path / "one"), toy_data, *common)
    train(str(tmp_path / "sp"), toy_data, *common, "args.sequence_parallel_size=2", nproc=2)
    valid = [[r["valid_loss"] for r in metrics(tmp_path / name) if "valid_loss" in r] for name in ("one", "sp")]
    assert len(valid[0]) == 1 and valid[1] == pytest.approx(valid[0], rel=1e-5)
    videos = sorted((tmp_path / "sp" / "validation" / "0000002").glob("*.mp4"))
    assert [video.name for video in videos] == ["00_a-red-square-moving-left.mp4"]  # written once, by rank 0


@pytest.mark.parametrize("world, sequence_size, cfg_size, heads, message", [
    (3, 3, 1, 4, "args.sequence_parallel_size=3 does not divide model.network_config.params.num_attention_heads=4: "
              "each rank of a sequence-parallel group attends with an equal share of the heads"),
    (6, 2, 2, 4, "6 ranks do not divide into groups of args.sequence_parallel_size=2 x args.cfg_parallel_size=2"),
])
def test_a_layout_that_does_not_divide_the_ranks_or_heads_is_one_line_before_any_group(monkeypatch, world,
                                                                                      sequence_size, cfg_size, heads,
                                                                                      message):
    from satvideo.config import ConfigError
    from satvideo.parallel import layout

    monkeypatch.setattr(layout.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(layout.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(layout.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(layout.dist, "new_group", lambda ranks: pytest.fail("a group was made"))
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        layout.build_layout(sequence_size, cfg_size, heads)
