"""SFT dataset, toy dataset, video files, prompt sources and the colour check."""

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import one_line_error, script_error
from torch.utils.data import DataLoader

from satvideo.config import ConfigError
from satvideo.data import SFTDataset
from satvideo.data.frames import resampled_indices, resize_cover_center_crop, strided_indices
from satvideo.data.toy import (BACKGROUND, DIRECTIONS, MIN_SIZE, PALETTE, SHAPES, check_toy_video,
                               dominant_palette_colour, make_toy_dataset, palette_colour_in, render_toy_video)
from satvideo.data.video import read_mp4, write_mp4
from satvideo.sampling import interactive_prompts, read_prompts, save_video, slugify, write_manifest_line

REPO = Path(__file__).resolve().parents[1]
CAPTION = re.compile(r"^a (red|green|blue|yellow) (square|circle) moving (left|right|up|down)$")
GRAY_BASE, GRAY_STEP = 10, 14  # frame i of a counter video has gray level GRAY_BASE + GRAY_STEP * i


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, list[tuple[Path, str]]]:
    out = tmp_path_factory.mktemp("toy")
    return out, make_toy_dataset(out, num=8, size=32, frames=17, fps=8, seed=0)


def write_counter_video(path: Path, num_frames: int, fps: int) -> None:
    """A 32x32 gray video whose brightness encodes the frame index."""
    levels = GRAY_BASE + GRAY_STEP * np.arange(num_frames, dtype=np.uint8)
    write_mp4(np.broadcast_to(levels[:, None, None, None], (num_frames, 32, 32, 3)).copy(), path, fps)


def decoded_frame_index(frame: torch.Tensor) -> int:
    """Invert write_counter_video for one frame [3, H, W] in [-1, 1]."""
    level = (frame.mean().item() + 1) * 127.5
    return round((level - GRAY_BASE) / GRAY_STEP)


def write_labelled(data_dir: Path, name: str, frames: np.ndarray | None = None, caption: str = "a clip") -> Path:
    """Add a video (or, with frames None, garbage bytes) and its label to an SFT folder."""
    video = data_dir / "videos" / f"{name}.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    if frames is None:
        video.write_bytes(b"not an mp4 " * 64)
    else:
        write_mp4(frames, video, fps=8)
    label = data_dir / "labels" / f"{name}.txt"
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(caption)
    return video


# ---- toy dataset ----


def test_toy_dataset_layout_and_captions(toy):
    out, written = toy
    videos = sorted((out / "videos").glob("*.mp4"))
    labels = sorted((out / "labels").glob("*.txt"))
    assert len(videos) == len(labels) == 8
    assert [v.stem for v in videos] == [label.stem for label in labels]
    assert [path for path, _ in written] == videos
    for (_, caption), label in zip(written, labels):
        assert CAPTION.match(caption), caption
        assert label.read_text().strip() == caption
    assert [caption.split()[1] for _, caption in written] == list(PALETTE) * 2


def test_toy_dataset_is_deterministic(toy, tmp_path):
    _, written = toy
    again = make_toy_dataset(tmp_path, num=8, size=32, frames=17, fps=8, seed=0)
    assert [c for _, c in again] == [c for _, c in written]
    np.testing.assert_array_equal(read_mp4(again[3][0])[0], read_mp4(written[3][0])[0])
    other_seed = make_toy_dataset(tmp_path / "other", num=8, size=32, frames=17, fps=8, seed=1)
    assert [c for _, c in other_seed] != [c for _, c in written]


def test_toy_shape_moves_in_captioned_direction(toy):
    _, written = toy
    for path, caption in written:
        frames, fps = read_mp4(path)
        assert frames.shape == (17, 32, 32, 3) and fps == 8
        bright = frames.max(axis=-1) > 100  # [T, H, W]
        first, last = (np.argwhere(bright[t]).mean(axis=0) for t in (0, -1))  # (y, x) centroids
        dy, dx = DIRECTIONS[caption.split()[-1]]
        assert np.sign(np.round(last - first)).tolist() == [dy, dx], caption


def fewest_shape_pixels(size: int) -> int:
    """The fewest pixels a toy shape covers in any frame, over both shapes, every direction and 50 seeds."""
    fewest = size * size
    for seed in range(50):
        rng = np.random.default_rng(seed)
        for shape in SHAPES:
            for direction in DIRECTIONS:
                video = render_toy_video("red", shape, direction, size, 9, rng)
                fewest = min(fewest, int((video != BACKGROUND).any(axis=-1).sum(axis=(1, 2)).min()))
    return fewest


def test_toy_size_bound_is_the_smallest_even_size_that_draws_the_shape_in_every_frame(tmp_path):
    assert fewest_shape_pixels(MIN_SIZE) >= 1 and fewest_shape_pixels(MIN_SIZE - 2) == 0
    for size in (MIN_SIZE - 2, MIN_SIZE + 1):
        with pytest.raises(ConfigError, match=rf"^size={size}: expected an even whole number >= {MIN_SIZE} "):
            make_toy_dataset(tmp_path / "toy", num=1, size=size)
    with pytest.raises(ConfigError, match=r"^frames=0: expected a whole number >= 1$"):
        make_toy_dataset(tmp_path / "toy", num=1, size=MIN_SIZE, frames=0)
    with pytest.raises(ConfigError, match=r"^fps=0: expected a number > 0$"):
        make_toy_dataset(tmp_path / "toy", num=1, size=MIN_SIZE, fps=0)
    assert not (tmp_path / "toy").exists()


def run_make_toy_dataset(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_toy_dataset.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


@pytest.mark.parametrize("flags, message", [
    (["--num", "0"], "--num=0: expected a whole number >= 1"),
    (["--frames", "0"], "--frames=0: expected a whole number >= 1"),
    (["--fps", "0"], "--fps=0: expected a number > 0"),
    (["--fps", "-8"], "--fps=-8: expected a number > 0"),
    (["--size", str(MIN_SIZE - 2)], f"--size={MIN_SIZE - 2}: expected an even whole number >= {MIN_SIZE} "),
    (["--size", str(MIN_SIZE + 1)], f"--size={MIN_SIZE + 1}: expected an even whole number >= {MIN_SIZE} "),
    (["--seed", "-1"], "--seed=-1: expected a whole number from 0 to 4294967295"),
])
def test_make_toy_dataset_script_refuses_a_bad_value_in_one_line(tmp_path, flags, message):
    out = tmp_path / "toy"  # in this process; the next test runs the command line
    assert script_error("make_toy_dataset.py", "--out", str(out), *flags).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_make_toy_dataset_script_leaves_an_occupied_out_as_it_was_unless_told(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    flags = ("--num", "1", "--size", "8", "--frames", "1")
    last = one_line_error(run_make_toy_dataset("--out", str(tmp_path), *flags))
    assert last == f"error: --out {tmp_path} exists and is not empty; choose another folder or pass --overwrite"
    assert script_error("make_toy_dataset.py", "--out", str(notes), *flags) == f"--out {notes} is a file; give a folder"
    assert script_error("make_toy_dataset.py", "--out", str(tmp_path), *flags, "--overwrite") == (
        f"--out {tmp_path} holds notes.txt, which this tool does not write; give a new or empty folder")
    assert list(tmp_path.iterdir()) == [notes] and notes.read_text() == "mine"
    toy = tmp_path / "toy"  # an earlier toy dataset is what --overwrite replaces
    assert run_make_toy_dataset("--out", str(toy), *flags).returncode == 0
    assert run_make_toy_dataset("--out", str(toy), *flags, "--num", "2", "--overwrite").returncode == 0
    assert sorted(path.name for path in toy.iterdir()) == ["labels", "videos"] and len(list(toy.glob("videos/*"))) == 2


def test_make_toy_dataset_script_fills_an_empty_folder_at_the_smallest_size(tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    result = run_make_toy_dataset("--out", str(out), "--num", "2", "--size", str(MIN_SIZE), "--frames", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote 2 videos to {out} in ")
    assert list(tmp_path.iterdir()) == [out]  # no partial folder left beside it
    videos = sorted((out / "videos").glob("*.mp4"))
    assert [video.name for video in videos] == ["00000.mp4", "00001.mp4"] and len(list(out.glob("labels/*.txt"))) == 2
    # ffmpeg reads it back (decord misreads some sizes, 6 among them: satvideo's readers call those clips corrupt)
    frames = imageio_ffmpeg.read_frames(str(videos[0]))
    assert next(frames)["size"] == (MIN_SIZE, MIN_SIZE) and len(list(frames)) == 3


# ---- SFTDataset ----


def test_sft_items_shapes_range_and_batching(toy):
    out, written = toy
    dataset = SFTDataset(str(out), video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)
    assert len(dataset) == 8
    item = dataset[5]
    assert item["mp4"].shape == (9, 3, 32, 32) and item["mp4"].dtype == torch.float32
    assert item["mp4"].min() >= -1 and item["mp4"].max() <= 1
    assert item["mp4"].min() < -0.8  # dark background
    assert item["txt"] == written[5][1]
    assert (item["num_frames"], item["fps"]) == (9, 8)

    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["mp4"].shape == (2, 9, 3, 32, 32)
    assert batch["txt"] == [written[0][1], written[1][1]]


def test_sft_same_fps_returns_decoded_frames(toy):
    out, written = toy
    item = SFTDataset(str(out), video_size=[32, 32], fps=8, max_num_frames=17, skip_frms_num=0)[2]
    decoded, _ = read_mp4(written[2][0])
    expected = torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(item["mp4"], expected)


def test_sft_resamples_16_to_8_fps(tmp_path):
    write_counter_video(tmp_path / "videos" / "count.mp4", num_frames=17, fps=16)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "count.txt").write_text("counter")
    item = SFTDataset(str(tmp_path), video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0,
                      frame_sampling="fps")[0]
    assert [decoded_frame_index(frame) for frame in item["mp4"]] == [0, 2, 4, 6, 8, 10, 12, 14, 16]


def test_sft_skips_ends_and_pads_short_clips(tmp_path, caplog):
    write_counter_video(tmp_path / "videos" / "count.mp4", num_frames=17, fps=16)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "count.txt").write_text("counter")
    dataset = SFTDataset(str(tmp_path), video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=1,
                         frame_sampling="fps")
    with caplog.at_level(logging.WARNING, logger="satvideo.data.sft"):
        first, second = dataset[0], dataset[0]
    # Frames 1..15 remain after skipping; at 8 fps that is 8 frames, padded with the last one.
    assert [decoded_frame_index(frame) for frame in first["mp4"]] == [1, 3, 5, 7, 9, 11, 13, 15, 15]
    assert (first["num_frames"], first["padded_frames"]) == (8, 1)
    assert second["mp4"].shape[0] == 9
    warnings = [r.getMessage() for r in caplog.records if "padding" in r.getMessage()]
    assert len(warnings) == 1 and "count.mp4" in warnings[0]


# The original's frame choice, by hand from its formulas (data_video.py, SFTDataset.__getitem__).
@pytest.mark.parametrize("num_source, skip, expected, padded", [
    # long (300 frames at 30 fps, read at 8 fps): end - start = int(49 / 8 * 30) = 183, stride 183 // 49 = 3
    (300, 0, list(range(0, 147, 3)), 0),
    (300, 3, list(range(3, 150, 3)), 0),
    # medium (120 frames: 32 at 8 fps, fewer than 49, but more than 49 frames): stride (120 - 2 skip) // 49 = 2
    (120, 0, list(range(0, 98, 2)), 0),
    (120, 3, list(range(3, 101, 2)), 0),
    # medium, 60 frames: stride max((60 - 6) // 49, 1) = 1, the first 49 frames after skipping
    (60, 3, list(range(3, 52)), 0),
    # short (45 frames <= 49): the largest 4k+1 after skipping, then padding
    (45, 0, list(range(0, 45)), 4),
    (45, 3, list(range(3, 40)), 12),
])
def test_strided_indices_follow_the_original(num_source, skip, expected, padded):
    indices = strided_indices(num_source, 30.0, 8, skip, 49)
    assert indices.tolist() == expected and 49 - len(indices) == padded


def write_binary_counter_video(path: Path, num_frames: int, fps: int) -> None:
    """A 32x32 video whose frame i shows i in binary: 8 vertical stripes, white where a bit is set."""
    bits = (np.arange(num_frames)[:, None] >> np.arange(8)[None, :]) & 1  # [T, 8]
    frames = np.repeat(bits * 255, 4, axis=1).astype(np.uint8)  # [T, 32]
    write_mp4(np.broadcast_to(frames[:, None, :, None], (num_frames, 32, 32, 3)).copy(), path, fps)


def binary_frame_index(frame: torch.Tensor) -> int:
    stripes = frame.mean(dim=(0, 1)).reshape(8, 4).mean(dim=1)  # [8] in [-1, 1]
    return int(sum(1 << bit for bit in range(8) if stripes[bit] > 0))


@pytest.mark.parametrize("num_source, max_frames, expected, padded", [
    (100, 9, list(range(3, 30, 3)), 0),  # long: end = int(3 + 9 / 8 * 30) = 36, stride 33 // 9 = 3
    (60, 17, list(range(3, 54, 3)), 0),  # medium: 16 frames at 8 fps; stride (57 - 3) // 17 = 3
    (13, 17, [3, 4, 5, 6, 7] + [7] * 12, 12),  # short: 13 - 6 = 7 -> 5 frames, padded with the last
])
def test_sft_default_decodes_the_originals_frames(tmp_path, num_source, max_frames, expected, padded):
    write_binary_counter_video(tmp_path / "videos" / "count.mp4", num_frames=num_source, fps=30)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "count.txt").write_text("first line\nsecond line\n")
    item = SFTDataset(str(tmp_path), video_size=[32, 32], fps=8, max_num_frames=max_frames, skip_frms_num=3)[0]
    assert [binary_frame_index(frame) for frame in item["mp4"]] == expected
    assert item["padded_frames"] == padded and item["txt"] == "first line"
    whole = SFTDataset(str(tmp_path), video_size=[32, 32], fps=8, max_num_frames=max_frames, caption="whole_file")
    assert whole[0]["txt"] == "first line\nsecond line"


def test_resize_follows_the_originals_integer_sizes_and_bicubic(monkeypatch):
    calls = []
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate",
                        lambda *args, **kwargs: calls.append(kwargs) or interpolate(*args, **kwargs))
    out = resize_cover_center_crop(torch.rand(2, 3, 30, 50), (16, 16))
    # width 50 * 16 / 30 = 26.67 truncates to 26 (rounding would give 27); centre crop from column 5
    assert calls[0]["size"] == (16, 26) and calls[0]["mode"] == "bicubic" and calls[0]["antialias"]
    assert out.shape == (2, 3, 16, 16)


def test_resampled_indices_non_integer_ratio():
    # 30 fps read at 8 fps: source times k * 3.75 rounded to the nearest frame.
    np.testing.assert_array_equal(resampled_indices(100, 30.0, 8, 0, 9), [0, 4, 8, 11, 15, 19, 23, 26, 30])
    np.testing.assert_array_equal(resampled_indices(10, 30.0, 8, 2, 9), [2, 6])
    with pytest.raises(ValueError, match="too few to skip 5"):
        resampled_indices(10, 30.0, 8, 5, 9)


def test_resize_cover_center_crop_exact():
    frames = torch.arange(32.0).reshape(1, 1, 4, 8)
    torch.testing.assert_close(resize_cover_center_crop(frames, (4, 4)), frames[..., 2:6])
    assert resize_cover_center_crop(frames, (2, 2)).shape == (1, 1, 2, 2)  # scaled by 1/2 to 2x4 first


def test_sft_center_crops_non_square_video(tmp_path):
    stripes = np.zeros((9, 32, 64, 3), dtype=np.uint8)
    stripes[:, :, :16] = PALETTE["red"]
    stripes[:, :, 16:48] = PALETTE["green"]
    stripes[:, :, 48:] = PALETTE["blue"]
    write_labelled(tmp_path, "stripes", stripes)

    # 32x64 -> scaled to 16x32 -> centre 16x16 is the green stripe only.
    square = SFTDataset(str(tmp_path), video_size=[16, 16], fps=8, max_num_frames=9, skip_frms_num=0)[0]["mp4"]
    assert square.shape == (9, 3, 16, 16)
    red, green, blue = square.unbind(dim=1)
    assert (green - torch.maximum(red, blue)).min() > 0.8

    # 32x64 -> scaled by 1.5 to 48x96 -> centre 32x96 keeps all stripes, red up to column 24.
    wide = SFTDataset(str(tmp_path), video_size=[32, 96], fps=8, max_num_frames=9, skip_frms_num=0)[0]["mp4"]
    assert wide.shape == (9, 3, 32, 96)
    column_colour = wide.mean(dim=(0, 2)).argmax(dim=0)  # strongest channel per column
    assert column_colour[:22].eq(0).all() and column_colour[26:70].eq(1).all() and column_colour[74:].eq(2).all()


# ---- SFTDataset: bad input ----


def test_missing_videos_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "videos"))):
        SFTDataset(str(tmp_path), video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)


def test_empty_videos_folder_is_named(tmp_path):
    (tmp_path / "videos").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "videos"))):
        SFTDataset(str(tmp_path), video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)


def test_frame_count_must_be_4k_plus_1(toy):
    with pytest.raises(ValueError, match="4k\\+1"):
        SFTDataset(str(toy[0]), video_size=[32, 32], fps=8, max_num_frames=8, skip_frms_num=0)


# ---- sampling helpers ----


def test_save_video_round_trip(tmp_path):
    # Width 64, not 48: decord 0.6 fails on 48 and 72 pixel wide videos.
    frames = torch.full((9, 3, 32, 64), -1.0)
    frames[:, 0, :16, :32] = 1.0  # red top-left quadrant
    frames[:, 2, 16:, 32:] = 3.0  # blue bottom-right, out of range: clamped to 1
    frames[:, :, 16:, :32] = 0.0  # mid gray bottom-left
    save_video(frames, str(tmp_path / "out" / "clip.mp4"), fps=8)
    decoded, fps = read_mp4(tmp_path / "out" / "clip.mp4")
    assert decoded.shape == (9, 32, 64, 3) and fps == 8
    expected = ((frames.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(decoded.astype(np.float32) - expected).mean() < 3
    np.testing.assert_allclose(decoded[:, 24, 48], [[0, 0, 255]] * 9, atol=8)


def test_save_video_rejects_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="even height and width, got 31x32"):
        save_video(torch.zeros(9, 3, 31, 32), str(tmp_path / "odd.mp4"), fps=8)


def test_read_prompts_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# toy prompts\na red square moving left\n\n   \n  a blue circle moving up  \n#skip\n")
    assert read_prompts(str(path)) == ["a red square moving left", "a blue circle moving up"]
    # a line ends at \n, \r\n or \r only: U+2028, form feed, \x1c or \x85 inside a prompt keep it one prompt
    path.write_text("a red square\u2028moving left\r\nthe sign\x1c says \x0cSTOP\x85 now\rlast\n", newline="")
    assert read_prompts(str(path)) == ["a red square\u2028moving left", "the sign\x1c says \x0cSTOP\x85 now", "last"]
    with pytest.raises(ConfigError, match=re.escape(f"args.input_file: {tmp_path / 'nope.txt'} does not exist")):
        read_prompts(str(tmp_path / "nope.txt"))


def test_interactive_prompts_stop_at_empty_line_or_eof():
    assert list(interactive_prompts(io.StringIO("a cat\n  a dog \n\nnot read\n"))) == ["a cat", "a dog"]
    assert list(interactive_prompts(io.StringIO("last one"))) == ["last one"]


def test_slugify():
    assert slugify("A Red Square, moving LEFT!") == "a-red-square-moving-left"
    assert slugify("???") == "video"
    long = slugify("word " * 30)
    assert len(long) <= 60 and not long.endswith("-")


def test_write_manifest_line_appends_json(tmp_path):
    write_manifest_line(str(tmp_path), {"file": "a.mp4", "prompt": "a red square", "seed": 1})
    write_manifest_line(str(tmp_path), {"file": "b.mp4", "prompt": "a blue circle", "seed": 2, "steps": 50})
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [1, 2]
    with pytest.raises(ValueError, match="lacks \\['seed'\\]"):
        write_manifest_line(str(tmp_path), {"file": "c.mp4", "prompt": "x"})


# ---- colour check ----


def test_dominant_palette_colour_recovers_every_toy_colour(toy):
    _, written = toy
    found = {caption.split()[1]: dominant_palette_colour(read_mp4(path)[0]) for path, caption in written}
    assert found == {colour: colour for colour in PALETTE}
    assert dominant_palette_colour(np.full((9, 32, 32, 3), 20, dtype=np.uint8)) is None


def test_palette_colour_in():
    assert palette_colour_in("A Yellow circle, moving up") == "yellow"
    assert palette_colour_in("a reddish square") is None


def test_toy_checks_score_every_real_clip(tmp_path):
    for size, frames in ((32, 9), (64, 17)):
        pairs = make_toy_dataset(tmp_path / str(size), num=24, size=size, frames=frames, seed=5)
        for path, caption in pairs:
            result = check_toy_video(read_mp4(path)[0], caption)
            assert result["colour_ok"] and result["one_shape_ok"] and result["direction_ok"], (caption, result)
            assert result["shapes"] == [1] * frames


def test_toy_checks_catch_wrong_videos():
    rng = np.random.default_rng(0)
    video = render_toy_video("blue", "square", "right", 32, 9, rng)
    assert check_toy_video(video, "a blue square moving right")["direction_ok"]
    wrong_colour = check_toy_video(video, "a red square moving right")
    assert wrong_colour["colour"] == "blue" and not wrong_colour["colour_ok"]
    reversed_motion = check_toy_video(video[::-1], "a blue square moving right")
    assert reversed_motion["direction"] == "left" and not reversed_motion["direction_ok"]
    two = np.maximum(video, render_toy_video("blue", "circle", "left", 32, 9, np.random.default_rng(7)))
    assert not check_toy_video(two, "a blue square moving right")["one_shape_ok"]
    still = np.repeat(video[:1], 9, axis=0)
    assert check_toy_video(still, "a blue square moving right")["direction"] is None


def test_check_script_prints_a_table_totals_and_a_contact_sheet(toy, tmp_path):
    _, written = toy
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    _, colour, shape, _, direction = written[1][1].split()
    wrong = f"a {'blue' if colour == 'red' else 'red'} {shape} moving {opposite[direction]}"
    prompts = [written[0][1], wrong]
    for (path, _), prompt, seed in zip(written[:2], prompts, range(2)):
        shutil.copy(path, tmp_path / path.name)
        write_manifest_line(str(tmp_path), {"file": path.name, "prompt": prompt, "seed": seed})

    def check(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "scripts" / "check_toy_videos.py"), str(tmp_path), *args]
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    report = check("--contact-sheet", str(tmp_path / "sheet.png"))
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[-2] == "colour right: 1/2 | one shape per frame: 2/2 | direction right: 1/2"
    assert (tmp_path / "sheet.png").is_file() and lines[-1].startswith("contact sheet:")
    assert check("--min-fraction", "0.9").returncode == 1


def sampled_toy_folder(toy, folder: Path) -> Path:
    """`folder` laid out as sampling leaves it: two toy videos with their own prompts, one manifest line each."""
    _, written = toy
    for seed, (path, prompt) in enumerate(written[:2]):
        shutil.copy(path, folder / path.name)
        write_manifest_line(str(folder), {"file": path.name, "prompt": prompt, "seed": seed})
    return folder


def run_check_toy_videos(folder: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "check_toy_videos.py"), str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=60)


def test_check_script_names_a_manifest_it_cannot_read(tmp_path):
    (tmp_path / "manifest.jsonl").write_bytes(b'{"file": "a.mp4", "prompt": "une vid\xe9o"}\n')
    last = one_line_error(run_check_toy_videos(tmp_path))
    assert last.startswith(f"error: {tmp_path / 'manifest.jsonl'} cannot be read ('utf-8' codec can't decode byte 0xe9")


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.mark.parametrize("flags, message", [
    (["--min-fraction", "nan"], "--min-fraction=nan: expected a number > 0 and <= 1"),
    (["--min-fraction", "5"], "--min-fraction=5.0: expected a number > 0 and <= 1"),
    (["--min-fraction", "0"], "--min-fraction=0.0: expected a number > 0 and <= 1"),
    (["--contact-sheet", "{folder}"], "--contact-sheet {folder} is a folder; give a file path"),
    (["--contact-sheet", "{folder}/sheet.txt"], "--contact-sheet {folder}/sheet.txt: expected a .png file"),
    (["--contact-sheet", "{folder}/none/sheet.png"],
     "--contact-sheet {folder}/none/sheet.png: there is no folder {folder}/none to write it in"),
    (["--contact-sheet", "{folder}/old.png"],
     "--contact-sheet {folder}/old.png exists; choose another path or pass --overwrite"),
])
def test_check_script_refuses_a_bad_flag_before_reading_a_video(toy, tmp_path, flags, message):
    folder = sampled_toy_folder(toy, tmp_path)
    (folder / "old.png").write_bytes(b"an earlier sheet")
    before = folder_contents(folder)
    # in this process; the tests below run the command line
    assert script_error("check_toy_videos.py", str(folder), *[flag.format(folder=folder) for flag in flags]) == \
        message.format(folder=folder)
    assert folder_contents(folder) == before


def test_check_script_refuses_a_folder_without_a_manifest(tmp_path):
    assert script_error("check_toy_videos.py", str(tmp_path)) == (f"no {tmp_path / 'manifest.jsonl'}; run sampling "
                                                                 "with this output folder first")
    assert list(tmp_path.iterdir()) == []


def test_check_script_names_a_manifest_line_without_a_prompt(tmp_path):
    write_manifest_line(str(tmp_path), {"file": "a.mp4", "prompt": "a red square moving up", "seed": 0})
    with open(tmp_path / "manifest.jsonl", "a", encoding="utf-8") as manifest:
        manifest.write(json.dumps({"file": "b.mp4", "seed": 1}) + "\n")
    result = run_check_toy_videos(tmp_path)
    assert one_line_error(result) == f"error: {tmp_path / 'manifest.jsonl'} line 2: b.mp4 has no prompt"


def test_check_script_passes_over_a_manifest_line_cut_by_a_kill(toy, tmp_path):
    folder = sampled_toy_folder(toy, tmp_path)
    with open(folder / "manifest.jsonl", "a", encoding="utf-8") as manifest:
        manifest.write('{"file": "00009.mp4", "pro')  # the kill came mid-line
    result = run_check_toy_videos(folder, "--min-fraction", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[-1] == "colour right: 2/2 | one shape per frame: 2/2 | direction right: 2/2"
    assert result.stderr.strip().splitlines()[-1] == (
        f"note: passed over 1 line(s) of {folder / 'manifest.jsonl'} that are not a JSON record of a file (cut short "
        "by a kill)")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_check_script_names_a_listed_video_it_cannot_read(toy, tmp_path, damage, capsys):
    folder = sampled_toy_folder(toy, tmp_path)
    video = sorted(folder.glob("*.mp4"))[1]
    if damage == "missing":
        video.unlink()
        problem = "not found"
    else:
        video.write_bytes(video.read_bytes()[:300])
        problem = "cannot be decoded (truncated or not a video)"
    before = folder_contents(folder)
    message = script_error("check_toy_videos.py", str(folder), "--contact-sheet", str(folder / "sheet.png"))
    assert message == f"{video}: listed in {folder / 'manifest.jsonl'} but {problem}"
    assert capsys.readouterr().out == "" and folder_contents(folder) == before  # no table, no sheet


def test_check_script_replaces_a_sheet_only_with_overwrite_and_says_why_it_fails(toy, tmp_path):
    folder = sampled_toy_folder(toy, tmp_path)
    sheet = folder / "sheet.png"
    sheet.write_bytes(b"an earlier sheet")
    result = run_check_toy_videos(folder, "--contact-sheet", str(sheet), "--overwrite", "--min-fraction", "1")
    assert result.returncode == 0, result.stderr
    assert sheet.read_bytes().startswith(b"\x89PNG") and not list(folder.glob(".*"))  # whole, no partial left
    _, written = toy
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    *words, direction = written[0][1].split()
    (folder / "manifest.jsonl").unlink()
    write_manifest_line(str(folder), {"file": written[0][0].name, "prompt": " ".join([*words, opposite[direction]]),
                                      "seed": 0})
    write_manifest_line(str(folder), {"file": written[1][0].name, "prompt": written[1][1], "seed": 1})
    failed = run_check_toy_videos(folder, "--min-fraction", "0.75")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == "below --min-fraction 0.75: fewest right 1/2"


def test_cached_batches_train_exactly_as_the_videos_they_came_from(toy, tmp_path):
    from satvideo.config import load_config
    from satvideo.data import CachedDataset
    from satvideo.data.cache import CacheSource, data_key, write_cache
    from satvideo.engine import VideoDiffusionEngine

    out, _ = toy
    params = dict(video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)
    videos = SFTDataset(str(out), **params)
    torch.manual_seed(0)
    engine = VideoDiffusionEngine.from_config(load_config(["configs/tiny/model.yaml", "configs/tiny/vae.yaml"]).model)
    write_cache(engine.first_stage_model, engine.conditioner, [CacheSource(str(out), 1.0, videos)], tmp_path / "cache",
                key={"data": data_key(params), "frozen": {}})
    cached = CachedDataset(str(tmp_path / "cache"), **params)
    assert len(cached) == len(videos) and cached[3]["txt"] == videos[3]["txt"]
    live = {"mp4": torch.stack([videos[i]["mp4"] for i in (0, 1)]), "txt": [videos[i]["txt"] for i in (0, 1)]}
    from_cache = {key: torch.stack([cached[i][key] for i in (0, 1)]) for key in ("moments", "text_features")}
    torch.manual_seed(5)
    expected = engine(live)  # posterior draw, caption dropout and noise from the same RNG stream
    torch.manual_seed(5)
    torch.testing.assert_close(engine(from_cache), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"the cache .* was made with data.params.fps=8, the config says 16: make it "
                                          r"again with scripts/precompute.py"):
        CachedDataset(str(tmp_path / "cache"), **{**params, "fps": 16})


def test_an_mp4_interrupted_while_encoding_leaves_nothing_behind(tmp_path, monkeypatch):
    import satvideo.data.video as video

    sent = []

    def interrupted(frame):
        sent.append(frame)
        if len(sent) == 2:  # ffmpeg has just started; it would create its file after this one was removed
            raise KeyboardInterrupt
        return np.asarray(frame)

    monkeypatch.setattr(video.np, "ascontiguousarray", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_mp4(np.zeros((9, 32, 32, 3), np.uint8), tmp_path / "a.mp4", 8)
    monkeypatch.undo()
    import time

    time.sleep(0.5)  # what an ffmpeg left running would write by now
    assert list(tmp_path.iterdir()) == []


def write_latents_into(folder: str, stem: str, overwrite: bool, count: int) -> None:
    """One process of the race below: `count` latents files into `folder`, each taking 20 ms to write (the other
    process meanwhile picks names and writes)."""
    import time

    import safetensors.torch

    from satvideo.sampling import OutputWriter

    save_file = safetensors.torch.save_file
    safetensors.torch.save_file = lambda *args, **kwargs: (time.sleep(0.02), save_file(*args, **kwargs))

    writer = OutputWriter(folder, overwrite=overwrite, contact_sheets=False)
    for number in range(count):
        name = stem if not overwrite else f"{stem}_{os.getpid()}_{number}"
        writer.write(name, {"prompt": "a cat", "seed": number}, latents={"latents": torch.zeros(2)})


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_writing_into_one_folder_keep_every_file_and_manifest_line(tmp_path, overwrite):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=write_latents_into, args=(str(tmp_path), "000_0_a-cat", overwrite, 15))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    files = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    lines = [json.loads(line)["file"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(files) == 30 and sorted(lines) == files  # none replaced, none lost, one line each
    assert sorted(path.name for path in tmp_path.glob("*.json")) == sorted(name[:-12] + ".json" for name in files)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_overwriting_into_a_folder_whose_manifest_is_not_utf8_is_one_line_before_anything_is_written(tmp_path):
    from satvideo.sampling import OutputWriter

    (tmp_path / "manifest.jsonl").write_bytes(b'{"file": "caf\xe9.mp4", "prompt": "x", "seed": 1}\n')
    with pytest.raises(ConfigError, match=r"^args.overwrite: .*manifest.jsonl is not UTF-8 text \(invalid "
                                          r"continuation byte at byte 13\); move it away to start a new one$"):
        OutputWriter(tmp_path, overwrite=True, contact_sheets=False)
    OutputWriter(tmp_path, overwrite=False, contact_sheets=False)  # lines are only appended: nothing to read back


def test_on_a_file_system_without_hard_links_outputs_are_still_named_and_never_replaced(tmp_path, monkeypatch):
    from satvideo.sampling import OutputWriter

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    writer = OutputWriter(tmp_path, overwrite=False, contact_sheets=False)
    for seed in range(2):
        writer.write("000_0_a-cat", {"prompt": "a cat", "seed": seed}, latents={"latents": torch.full((2,), seed)})
    from safetensors.torch import load_file

    assert [load_file(tmp_path / name)["latents"][0].item() for name in
            ("000_0_a-cat.safetensors", "000_0_a-cat-2.safetensors")] == [0, 1]
    assert not list(tmp_path.glob(".*"))
