"""Sources beside the SFT folder (JSONL manifests, WebDataset tar shards), mixing by weights, shape buckets, and
exact resume of mixed and bucketed runs after a kill."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset

from satvideo.checkpoint import network_state_dict, read_latest
from satvideo.config import args_namespace, load_config
from satvideo.data import SFTDataset
from satvideo.data.manifest import ManifestDataset
from satvideo.data.packed import PackedList
from satvideo.data.shards import TarShardDataset
from satvideo.data.sources import WeightedConcat, bucket_groups, build_dataset
from satvideo.data.toy import make_toy_dataset, render_toy_video, toy_caption
from satvideo.data.video import write_mp4
from satvideo.engine import VideoDiffusionEngine
from satvideo.training.data_order import BucketBatches
from satvideo.training.validation import Validator
from test_training import LAUNCHER_VARIABLES, ROOT, TINY, interrupted_and_resumed, metrics, train

PARAMS = dict(video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)


def folder_to_shards(folder: Path, out: Path, per_shard: int) -> Path:
    """The SFT folder's clips as tar shards of `per_shard` samples (mp4 + txt, or json caption for odd ones)."""
    out.mkdir(parents=True)
    videos = sorted((folder / "videos").glob("*.mp4"))
    for start in range(0, len(videos), per_shard):
        with webdataset.TarWriter(str(out / f"part-{start // per_shard:03d}.tar")) as sink:
            for index, video in enumerate(videos[start:start + per_shard], start=start):
                caption = (folder / "labels" / f"{video.stem}.txt").read_text()
                text = {"txt": caption} if index % 2 == 0 else {"json": {"caption": caption.strip()}}
                sink.write({"__key__": video.stem, "mp4": video.read_bytes(), **text})
    return out


def folder_to_manifest(folder: Path, out: Path) -> Path:
    """A JSONL manifest of the folder's clips (paths relative to the manifest)."""
    lines = [json.dumps({"video": os.path.relpath(video, out.parent),
                         "caption": (folder / "labels" / f"{video.stem}.txt").read_text().strip()})
             for video in sorted((folder / "videos").glob("*.mp4"))]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for name, seed in (("folder", 0), ("listed", 1), ("sharded", 2)):
        make_toy_dataset(root / name, num=8, size=32, frames=9, fps=8, seed=seed)
    return {"folder": root / "folder", "manifest": folder_to_manifest(root / "listed", root / "listed.jsonl"),
            "shards": folder_to_shards(root / "sharded", root / "shards", per_shard=3)}


def test_manifest_and_shards_give_the_items_the_folder_gives(sources, tmp_path):
    folder = SFTDataset(str(sources["folder"]), **PARAMS)
    for other in (ManifestDataset(str(folder_to_manifest(sources["folder"], tmp_path / "m.jsonl")), **PARAMS),
                  TarShardDataset(str(folder_to_shards(sources["folder"], tmp_path / "t", per_shard=3)), **PARAMS)):
        assert len(other) == len(folder) == 8
        for index in (0, 3, 7):
            expected, item = folder[index], other[index]
            assert item["txt"] == expected["txt"] and torch.equal(item["mp4"], expected["mp4"])
    pattern = str(sources["shards"] / "part-{000..002}.tar")
    assert len(TarShardDataset(pattern, **PARAMS)) == 8


def test_manifest_errors_name_file_and_line(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"video": "a.mp4", "caption": "x"}\n{"caption": "no video"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a \"video\" path"):
        ManifestDataset(str(manifest), **PARAMS)
    manifest.write_text('{"video": "a.mp4"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        ManifestDataset(str(manifest), **PARAMS)


def test_packed_list_returns_what_it_was_given():
    values = ["une vidéo", "", {"video": "a.mp4", "fps": 29.97, "frames": 49}, [3, "k", {"mp4": [512, 9]}], -1]
    packed = PackedList(values)
    assert len(packed) == 5 and list(packed) == values and packed[-1] == -1 and packed[2]["fps"] == 29.97
    with pytest.raises(IndexError, match="index 5 out of range for 5 entries"):
        packed[5]
    assert len(PackedList([])) == 0 and list(PackedList(iter([]))) == []


def private_bytes() -> int:
    rollup = Path("/proc/self/smaps_rollup").read_text()
    return sum(int(rollup.split(f"{field}:")[1].split()[0]) * 1024 for field in ("Private_Clean", "Private_Dirty"))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_forked_data_worker_reading_every_sample_copies_no_per_sample_table(tmp_path):
    """With a Python list per sample (the entries and names of 100,000 manifest lines) a forked worker that reads
    each sample once copied 76 MB, as reference counts changed; packed tables are shared, not copied."""
    manifest = tmp_path / "large.jsonl"
    with manifest.open("w") as file:
        for index in range(100_000):
            file.write(json.dumps({"video": f"clips/{index:06d}.mp4", "caption": f"clip {index} " * 8, "fps": 30,
                                   "source": "ignored and not kept"}) + "\n")
    dataset = ManifestDataset(str(manifest), **PARAMS)
    assert dataset.caption(99_999) == ("clip 99999 " * 8).strip() and "source" not in dataset.entries[0]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: read every sample's name, path and caption, report its private memory growth
        before = private_bytes()
        for index in range(len(dataset)):
            dataset.video_bytes(index), dataset.caption(index), dataset.names[index]
        os.write(write, str(private_bytes() - before).encode())
        os._exit(0)
    os.close(write)
    grown = int(os.read(read, 64))
    os.waitpid(child, 0)
    assert grown < 8 * 2**20, f"the worker copied {grown / 2**20:.0f} MB"


def test_weights_repeat_sources_as_sat_concat_dataset(sources):
    config = load_config(TINY)
    paths = [str(sources["folder"]), str(sources["manifest"]), str(sources["shards"])]
    mixed = build_dataset(config, paths, "args.train_data", weights=[2, 1, 0.5])
    assert isinstance(mixed, WeightedConcat) and mixed.sizes == [16, 8, 4] and len(mixed) == 28
    assert [type(d).__name__ for d in mixed.datasets] == ["SFTDataset", "ManifestDataset", "TarShardDataset"]
    assert mixed[8]["txt"] == mixed[0]["txt"] and mixed[24]["txt"] == mixed.datasets[2][0]["txt"]
    from satvideo.config import ConfigError
    with pytest.raises(ConfigError, match=r"args.train_data_weights=\[1\]: expected 3 positive numbers"):
        build_dataset(config, paths, "args.train_data", weights=[1])
    with pytest.raises(ConfigError) as error:  # 8 samples at 0.1: int(0.8) = 0 slots, the source would drop out
        build_dataset(config, paths, "args.train_data", weights=[1, 0.1, 1])
    assert str(error.value) == (f"args.train_data_weights: {paths[1]} holds 8 samples, which at weight 0.1 take no "
                                "slot of the mixture (int(samples * weight) = 0); raise its weight")


def kill_after_checkpoint(command: list[str], save: Path, iteration: int, timeout: float = 300) -> None:
    """Start a training run and kill its whole process group (SIGKILL) once `latest` reaches `iteration`."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while (read_latest(str(save)) or 0) < iteration:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def assert_resume_is_exact(tmp_path, data: str, *overrides: str) -> None:
    common = ("args.train_iters=10", "args.log_interval=1", "args.save_interval=2", "args.num_workers=1", *overrides)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(str(straight), data, *common)
    command = [sys.executable, "train_video.py", "--base", *TINY, f"args.save={resumed}", f"args.train_data=[{data}]",
               *common]
    kill_after_checkpoint(command, resumed, 4)
    output = train(str(resumed), data, *common)
    resumed_at = int(re.search(r"resumed from .* at iteration (\d+)", output).group(1))
    assert 4 <= resumed_at < 10  # killed mid-run
    expected, got = network_state_dict(str(straight)), network_state_dict(str(resumed))
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(resumed)]


@pytest.mark.slow
def test_mixed_sources_2_1_1_train_and_resume_bit_exactly_after_a_kill(tmp_path, sources):
    data = f"{sources['folder']},{sources['manifest']},{sources['shards']}"
    assert_resume_is_exact(tmp_path, data, "args.train_data_weights=[2,1,1]", "args.batch_size=3")


def wide_clips(folder: Path, num: int, frames: int) -> None:
    """Toy clips 32x64 (a wide aspect ratio) of `frames` frames, added to an SFT folder."""
    rng = np.random.default_rng(7)
    for index in range(num):
        square = render_toy_video("red", "circle", "right", 64, frames, rng)
        write_mp4(square[:, 16:48], folder / "videos" / f"wide{index:02d}.mp4", fps=8)
        (folder / "labels" / f"wide{index:02d}.txt").write_text(toy_caption("red", "circle", "right") + "\n")


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("buckets")
    make_toy_dataset(folder, num=8, size=32, frames=9, fps=8, seed=3)
    wide_clips(folder, num=8, frames=5)
    return folder


BUCKETS = "data.params.buckets=[[9,32,32],[5,32,64],[9,32,64]]"


def test_bucketed_batches_are_single_shape_and_every_rank_shares_the_bucket(two_shapes):
    config = load_config(TINY, [BUCKETS])
    dataset = build_dataset(config, [str(two_shapes)], "args.train_data")
    groups = bucket_groups(dataset)
    # the square clips fill the 9-frame square bucket; the wide 5-frame clips cannot fill [9, 32, 64]
    assert [len(group) for group in groups] == [8, 8, 0]
    ranks = [BucketBatches(groups, 2, rank, 2, seed=1) for rank in range(2)]
    batches = [list(order) for order in ranks]
    assert len(batches[0]) == len(batches[1]) == 4
    shapes_seen = set()
    for batch_0, batch_1 in zip(*batches):
        shapes = {dataset.shape(index) for index in batch_0 + batch_1}
        assert len(shapes) == 1
        shapes_seen |= shapes
        items = [dataset[index] for index in batch_0]
        assert torch.stack([item["mp4"] for item in items]).shape[1:] == (*[shapes.pop()][0][:1], 3,
                                                                             *dataset.shape(batch_0[0])[1:])
    assert shapes_seen == {(9, 32, 32), (5, 32, 64)}
    ranks[0].set_position(0, 3)
    assert list(ranks[0]) == batches[0][3:]


def test_validation_batches_hold_one_bucket_each_and_cover_every_bucket(two_shapes):
    config = load_config(TINY, [BUCKETS, f"args.valid_data=[{two_shapes}]", "args.eval_iters=6",
                                "args.eval_batch_size=3"])
    validator = Validator(config, args_namespace(config), torch.device("cpu"))
    # 8 square clips then 8 wide ones: 3 + 3 + 2 of each bucket, never a batch across the two
    batches = [validator.batch_indices(index) for index in range(6)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13], [14, 15]]
    assert validator.batch_indices(6) == batches[0]
    torch.manual_seed(0)
    record, _ = validator(VideoDiffusionEngine.from_config(config.model), 1, None)
    assert math.isfinite(record["valid_loss"])  # default_collate stacked every batch


@pytest.mark.slow
def test_tiny_model_trains_on_two_buckets_and_resumes_exactly(tmp_path, two_shapes):
    save = interrupted_and_resumed(tmp_path, str(two_shapes), BUCKETS, "args.num_workers=1", nproc=1)
    assert all(math.isfinite(record["loss"]) for record in metrics(save))


@pytest.mark.parametrize("family", ["2b", "5b", "1.5_5b"])
def test_the_transformer_runs_on_every_bucket_grid(family):
    from conftest import TINY_TEXT_DIM, TINY_TEXT_LENGTH, tiny_network_config
    from satvideo.config import instantiate_from_config
    from satvideo.dit.positions import sincos_3d

    torch.manual_seed(0)
    network = instantiate_from_config(tiny_network_config(family))
    context = torch.randn(2, TINY_TEXT_LENGTH, TINY_TEXT_DIM)
    for frames, height, width in ((4, 8, 8), (2, 8, 12)):  # latent grids of two buckets
        x = torch.randn(2, frames, 16, height, width)
        out = network(x, torch.tensor([10, 500]), context=context)
        assert out.shape == x.shape and torch.isfinite(out).all()
    if family == "2b":  # sin-cos positions are computed for the grid at hand, not the configured one
        mixin = network.mixins["pos_embed"]
        grid = (2, 4, 6)  # (frames, height, width) / patch 2
        torch.testing.assert_close(mixin.table(grid, torch.device("cpu"), torch.float32),
                                   sincos_3d(mixin.hidden_size, grid, mixin.interpolation))
