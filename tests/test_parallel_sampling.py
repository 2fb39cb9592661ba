"""Parallel sampling on gloo: one video over a sequence-parallel pair (decoded context-parallel), the two CFG
branches on two ranks beside prompt sharding and around sequence-parallel pairs give one rank's videos and latents
for the same seeds."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from test_training import run, toy_data, train  # noqa: F401 (toy_data is a fixture)

PROMPTS = ["a red square moving left", "a blue circle moving up"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_data):
    save = tmp_path_factory.mktemp("run") / "run"
    train(str(save), toy_data, "args.train_iters=2", "args.log_interval=1", "args.save_interval=2",
          "args.batch_size=2")
    prompts = save.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return save, prompts


def sample(checkpoint, out, *overrides: str, nproc: int = 1) -> dict[str, torch.Tensor]:
    save, prompts = checkpoint
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    run(launcher + ["sample_video.py", "--base", "configs/tiny/model.yaml", "configs/tiny/vae.yaml",
                    "configs/tiny/sample.yaml", f"args.load={save}", f"args.input_file={prompts}",
                    f"args.output_dir={out}", "model.sampler_config.params.num_steps=4",
                    "model.sampler_config.params.guider_config.params.num_steps=4", "args.only_save_latents=true",
                    *overrides])  # later overrides win
    return {path.stem: load_file(path)["latents"] for path in sorted(out.glob("*.safetensors"))}


@pytest.mark.slow
def test_sequence_and_cfg_parallel_sampling_equal_one_rank(tmp_path, checkpoint):
    expected = sample(checkpoint, tmp_path / "one")
    assert len(expected) == len(PROMPTS)
    # CFG pairs of two ranks, once beside prompt sharding and once around sequence-parallel pairs (sequence
    # parallelism alone: the decoding test below)
    runs = {"data 2 x cfg 2": (["args.cfg_parallel_size=2"], 4),
            "cfg 2 x sequence 2": (["args.cfg_parallel_size=2", "args.sequence_parallel_size=2"], 4)}
    for name, (overrides, nproc) in runs.items():
        got = sample(checkpoint, tmp_path / name.replace(" ", "_"), *overrides, nproc=nproc)
        assert got.keys() == expected.keys(), name  # every prompt once, written by one rank
        for stem, latents in expected.items():
            assert (got[stem] - latents).abs().max() <= 1e-4 * latents.abs().max(), (name, stem)


@pytest.mark.slow
def test_sequence_parallel_sampling_and_context_parallel_decoding_give_one_ranks_video(tmp_path, checkpoint):
    from satvideo.data.video import read_mp4

    five_latents = ("args.sampling_num_frames=5", "args.only_save_latents=false")  # 17 frames: two decode chunks
    sample(checkpoint, tmp_path / "one", *five_latents)
    sample(checkpoint, tmp_path / "sp", *five_latents, "args.sequence_parallel_size=2", nproc=2)
    for video in sorted((tmp_path / "one").glob("*.mp4")):
        expected, got = read_mp4(video)[0], read_mp4(tmp_path / "sp" / video.name)[0]
        assert expected.shape == (17, 32, 32, 3) and (expected == got).all(), video.name
