"""Data as it comes in the wild: whole sources that cannot be used, buckets of unreadable files, slow or very short
clips, odd file names, label files and manifest fields, and damaged caches; each is used, counted or refused in
one line, never a traceback from a data worker."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from satvideo.config import ConfigError, SatvideoError, load_config
from satvideo.data import SFTDataset
from satvideo.data.buckets import fillable_frames
from satvideo.data.clips import VideoInfo
from satvideo.data.frames import strided_indices
from satvideo.data.health import SKIPPED, BadSample, UnusableData, tally_dict
from satvideo.data.manifest import ManifestDataset, read_manifest
from satvideo.data.packed import PackedList
from satvideo.data.sources import build_dataset
from satvideo.data.toy import make_toy_dataset
from test_training import TINY

PARAMS = dict(video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy")
    make_toy_dataset(folder, num=4, size=32, frames=9, fps=8, seed=0)
    return folder


def copy_of(toy: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(toy, folder)
    return folder


def test_a_source_without_usable_samples_stops_in_one_line_even_from_a_data_worker(toy, tmp_path):
    folder = copy_of(toy, tmp_path)
    shutil.rmtree(folder / "labels")
    dataset = SFTDataset(str(folder), **PARAMS)
    expected = (f"4 samples in a row cannot be used (missing_caption), the first {folder}/labels/00000.txt: check "
                "the data with scripts/check_dataset.py")
    with pytest.raises(UnusableData) as error:
        dataset[0]
    assert str(error.value) == expected
    with pytest.raises(SatvideoError) as error:  # rebuilt by the DataLoader with the worker's traceback
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    assert str(error.value) == expected


def test_each_bad_sample_counts_once_however_many_stand_ins_it_passes_over(toy, tmp_path):
    folder = copy_of(toy, tmp_path)
    for stem in ("00001", "00002"):  # two bad clips in a row
        (folder / "videos" / f"{stem}.mp4").write_bytes(b"")
    dataset = SFTDataset(str(folder), **PARAMS)
    tallies = [tally_dict(dataset[index][SKIPPED]) for index in range(len(dataset))]
    assert tallies == [{}, {"empty_file": 1}, {"empty_file": 1}, {}]  # 2 of 4 drawn, not 3


def test_unreadable_clips_join_the_fullest_bucket_and_a_bucket_stops_trying_after_its_members(toy, tmp_path):
    folder = copy_of(toy, tmp_path)
    for stem in ("zz_bad1", "zz_bad2"):
        (folder / "videos" / f"{stem}.mp4").write_bytes(b"")
        (folder / "labels" / f"{stem}.txt").write_text("a caption\n")
    buckets = "data.params.buckets=[[9,32,64],[9,32,32]]"
    dataset = build_dataset(load_config(TINY, [buckets]), [str(folder)], "args.train_data")
    assert [group.tolist() for group in dataset.groups] == [[], [0, 1, 2, 3, 4, 5]]
    assert tally_dict(dataset[4][SKIPPED]) == {"empty_file": 1} and dataset[4]["txt"] == dataset[0]["txt"]

    shutil.rmtree(folder / "labels")
    dataset = build_dataset(load_config(TINY, [buckets]), [str(folder)], "args.train_data")
    with pytest.raises(UnusableData, match=r"^6 samples in a row of shape \[9, 32, 32\] cannot be used"):
        dataset[0]


def test_a_source_slower_than_the_data_fps_gives_consecutive_frames():
    # 100 frames at 4 fps read at 8 fps: the original's stride would be 0 (it raises); satvideo takes 9 in a row
    assert strided_indices(100, 4.0, 8, 3, 9).tolist() == list(range(3, 12))
    assert strided_indices(300, 30.0, 8, 3, 9).tolist() == list(range(3, 30, 3))  # the original's stride, as before
    # buckets judge such a clip alike: with stride sampling it fills only its own frames
    slow = VideoInfo(num_frames=100, fps=4.0, height=32, width=32)
    assert fillable_frames(slow, 8, 3, repeats_frames=False) == 94
    assert fillable_frames(slow, 8, 3, repeats_frames=True) == 188  # frame_sampling fps reads each frame twice


def test_one_frame_clips_for_a_one_frame_model(toy):
    dataset = SFTDataset(str(toy), video_size=[32, 32], fps=8, max_num_frames=1, skip_frms_num=0)
    item = dataset[0]
    assert item["mp4"].shape == (1, 3, 32, 32) and item["padded_frames"] == 0


def test_file_names_that_are_not_utf8_survive_the_packed_list(toy, tmp_path):
    folder = copy_of(toy, tmp_path)
    for kind, suffix in (("videos", ".mp4"), ("labels", ".txt")):
        os.rename(folder / kind / f"00000{suffix}", os.fsencode(folder / kind) + b"/caf\xe9" + suffix.encode())
    names = PackedList(["caf\udce9", "\ud800 lone", "plain"])
    assert list(names) == ["caf\udce9", "\ud800 lone", "plain"]
    dataset = SFTDataset(str(folder), **PARAMS)
    assert any(name.endswith("caf\udce9.mp4") for name in dataset.names)
    assert all(dataset[index][SKIPPED].sum() == 0 for index in range(len(dataset)))


def test_label_files_with_a_byte_order_mark_or_that_are_folders(toy, tmp_path):
    folder = copy_of(toy, tmp_path)
    (folder / "labels" / "00000.txt").write_bytes(b"\xef\xbb\xbfa red square moving left\n")
    (folder / "labels" / "00001.txt").unlink()
    (folder / "labels" / "00001.txt").mkdir()
    dataset = SFTDataset(str(folder), **PARAMS)
    assert dataset.load(0)["txt"] == "a red square moving left"
    with pytest.raises(BadSample, match="00001.txt: a file that exists but cannot be read") as error:
        dataset.load(1)
    assert error.value.reason == "unreadable_file"


@pytest.mark.parametrize("field, message", [
    ('"fps": "abc"', '"fps": "abc": expected a number > 0 (or null)'),
    ('"fps": -8', '"fps": -8: expected a number > 0 (or null)'),
    ('"image": 5', '"image": 5: expected a string (or null)'),
    ('"width": 0', '"width": 0: expected a whole number >= 1 (or null)'),
])
def test_manifest_fields_are_checked_when_it_is_read(tmp_path, field, message):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text('{"video": "a.mp4", "caption": "a"}\n{"video": "b.mp4", "caption": "b", ' + field + "}\n")
    with pytest.raises(ValueError) as error:
        ManifestDataset(str(manifest), **PARAMS)
    assert str(error.value) == f"{manifest}:2: {message}"


def test_a_manifest_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"video": "a.mp4", "caption": "a"}\n')  # a byte-order mark is no part of it
    assert [entry["video"] for entry in read_manifest(manifest)] == ["a.mp4"]
    manifest.write_text('{"video": "a.mp4", "caption": "two\u2028lines\x85"}\r\n', encoding="utf-8")  # raw in JSON
    assert [entry["caption"] for entry in read_manifest(manifest)] == ["two\u2028lines\x85"]
    manifest.write_bytes(b'{"video": "a.mp4", "caption": "une vid\xe9o"}\n')
    with pytest.raises(UnicodeDecodeError):  # a ValueError, which the dataset reports with the path
        read_manifest(manifest)

    def refuse(path, *args, **kwargs):  # as a file without read access (root reads any, so it is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ValueError, match=rf"^manifest {manifest} cannot be read \(Permission denied\)$"):
        read_manifest(manifest)


def test_only_an_image_to_video_model_reads_a_samples_own_image(toy, tmp_path):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"video": str(toy / "videos" / "00000.mp4"), "caption": "a red square",
                                    "image": "missing.png"}) + "\n")
    text_to_video = build_dataset(load_config(TINY), [str(manifest)], "args.train_data")
    assert text_to_video[0]["image"].shape == (3, 32, 32)  # the clip's first frame
    image_to_video = build_dataset(load_config(TINY, ["model.noised_image_input=true"]), [str(manifest)],
                                   "args.train_data")
    with pytest.raises(BadSample, match="missing.png|conditioning image"):
        image_to_video.load(0)


def test_sixteen_bit_grey_images_keep_their_levels():
    import io

    from PIL import Image

    from satvideo.data.clips import ClipDataset

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    png = io.BytesIO()
    Image.fromarray(ramp).save(png, format="PNG")
    image = ClipDataset.load_image(png.getvalue(), "ramp.png", (64, 64))
    expected = torch.from_numpy((ramp >> 8).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(image[0], expected, atol=1 / 127.5)


@pytest.mark.parametrize("override, message", [
    ("data.params.video_size=[32]", "data.params.video_size=[32]: expected [height, width] in pixels"),
    ("data.params.fps=0", "data.params.fps=0: expected a number > 0"),
    ("data.params.skip_frms_num=-2", "data.params.skip_frms_num=-2: expected a whole number >= 0"),
    ("data.params.max_num_frames=-3", "data.params.max_num_frames=-3: expected 4k+1 frames for the causal VAE (1, 5, "
                                      "9, ...)"),
    ("data.params.max_num_frames=8", "data.params.max_num_frames=8: expected 4k+1 frames for the causal VAE (1, 5, "
                                     "9, ...)"),
    ("data.params.buckets=[9,32,32]", "data.params.buckets[0]=9: expected [frames, height, width] (buckets is a list "
                                      "of such lists)"),
    ("data.params.buckets=[[9,-32,32]]", "data.params.buckets[0]=[9, -32, 32]: frames, height and width must be "
                                         "positive"),
    ("data.params.buckets=[[-3,32,32]]", "data.params.buckets[0]=[-3, 32, 32]: frames, height and width must be "
                                         "positive"),
])
def test_data_params_are_checked_when_the_dataset_is_built(toy, override, message):
    with pytest.raises(ConfigError) as error:
        build_dataset(load_config(TINY, [override]), [str(toy)], "args.train_data")
    assert str(error.value) == f"args.train_data {toy}: {message}"


def test_a_dataset_smaller_than_the_ranks_is_one_line(toy):
    from types import SimpleNamespace

    from satvideo.training.loop import batch_order

    layout = SimpleNamespace(data_rank=0, data_size=8)
    with pytest.raises(ConfigError, match=r"^args.train_data holds 4 samples \(with args.train_data_weights\): no "
                                          r"micro-batch of args.batch_size=1 for each of 8 data-parallel ranks$"):
        batch_order(SFTDataset(str(toy), **PARAMS), 1, SimpleNamespace(seed=0), layout)


def test_a_bucket_too_small_for_one_global_batch_is_named(caplog):
    from types import SimpleNamespace

    from satvideo.training.loop import batch_order

    class Bucketed:  # 8 clips in bucket 0, 3 in bucket 1, as a bucketed dataset lists them
        groups = [np.arange(8), np.arange(8, 11)]

        def __len__(self) -> int:
            return 11

    layout = SimpleNamespace(data_rank=0, data_size=1)
    with caplog.at_level("WARNING"):
        order = batch_order(Bucketed(), 4, SimpleNamespace(seed=0), layout)
    assert order.batches_per_epoch == 2
    assert ("data.params.buckets [1] hold [3] samples, fewer than args.batch_size=4 x 1 data-parallel ranks: they are "
            "never trained on") in caplog.text
