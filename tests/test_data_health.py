"""Bad samples: passed over without killing a data worker, counted per reason in the training log, fatal above
data.max_bad_share, and reported per file by scripts/check_dataset.py."""

import json
import subprocess
import sys

import pytest
import torch

from bad_dataset import BAD_SAMPLES, make_bad_dataset
from satvideo.data import SFTDataset
from satvideo.data.health import REASONS, SKIPPED, tally_dict
from test_training import ROOT, TINY, metrics, train

PARAMS = dict(video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)
# Sorted by path, the bad clips follow the 8 good ones; a bad clip at position k is replaced by the next usable
# one, passing over every bad clip from k to the end, but only the drawn one is counted (the others are counted
# when they are drawn): each reason once per epoch, 8 of 16 samples.
EXPECTED_PER_EPOCH = {reason: 1 for reason in BAD_SAMPLES.values()}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    return make_bad_dataset(tmp_path_factory.mktemp("bad"))


def test_each_bad_sample_is_passed_over_with_its_reason(bad_data):
    dataset = SFTDataset(str(bad_data), **PARAMS)
    assert len(dataset) == 16
    for position, stem in enumerate(sorted(BAD_SAMPLES), start=8):
        item = dataset[position]
        assert item["txt"].startswith("a ")  # the first good clip (position 0) stands in
        assert tally_dict(item[SKIPPED]) == {BAD_SAMPLES[stem]: 1}
    assert tally_dict(dataset[3][SKIPPED]) == {}


def test_check_dataset_names_every_bad_file_and_its_reason(bad_data):
    result = subprocess.run([sys.executable, "scripts/check_dataset.py", str(bad_data), "--base", *TINY],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    for stem, reason in BAD_SAMPLES.items():
        assert any(line.startswith(f"BAD {reason}") and f"{stem}.mp4" in line for line in lines), (stem, lines)
    good = [line for line in lines if line.startswith("ok ")]
    assert len(good) == 8 and all("9 frames" in line and "32x32" in line and "tokens" in line for line in good)
    assert lines[-1] == "8 ok, 8 bad: " + ", ".join(f"{reason} 1" for reason in REASONS
                                                    if reason in BAD_SAMPLES.values())


def test_check_dataset_passes_clean_data(tmp_path):
    from satvideo.data.toy import make_toy_dataset

    make_toy_dataset(tmp_path, num=2, size=32, frames=9)
    result = subprocess.run([sys.executable, "scripts/check_dataset.py", str(tmp_path), "--size", "32", "32",
                             "--frames", "9", "--skip", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "2 ok, 0 bad"



def check_dataset_error(*args: str) -> str:
    result = subprocess.run([sys.executable, "scripts/check_dataset.py", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--fps", "0"], "--fps 0: expected a number > 0"),
    (["--size", "0", "32"], "--size 0 32: expected [height, width] in pixels"),
    (["--frames", "10"], "--frames 10: expected 4k+1 frames for the causal VAE (1, 5, 9, ...)"),
    (["--frames", "-3"], "--frames -3: expected 4k+1 frames for the causal VAE (1, 5, 9, ...)"),
    (["--skip", "-1"], "--skip -1: expected a whole number >= 0"),
])
def test_check_dataset_names_the_flag_a_bad_value_came_from(tmp_path, flags, message):
    assert check_dataset_error(str(tmp_path), *flags) == f"error: {message}"


def test_check_dataset_names_the_config_key_a_bad_value_came_from(tmp_path):
    last = check_dataset_error(str(tmp_path), "--base", *TINY, "data.params.fps=0")
    assert last == f"error: {tmp_path}: data.params.fps=0: expected a number > 0"

@pytest.mark.slow
def test_two_rank_training_on_bad_data_runs_to_the_end_and_counts_each_reason(tmp_path, bad_data):
    save = tmp_path / "run"
    output = train(str(save), str(bad_data), "args.train_iters=8", "args.log_interval=4", "args.save_interval=8",
                   "args.batch_size=2", "args.num_workers=1", "data.max_bad_share=0.8", nproc=2)
    assert "iteration 8 | loss" in output
    records = metrics(save)
    # 16 samples over 2 ranks x 2 per micro-batch: every 4 iterations one epoch, each sample drawn once
    assert [record["samples"] for record in records] == [16, 16]
    assert all(record["bad_samples"] == EXPECTED_PER_EPOCH for record in records)
    for reason in set(BAD_SAMPLES.values()):
        assert f"(first {reason};" in output


def test_too_many_bad_samples_stop_the_run_with_the_reasons(tmp_path, bad_data):
    save = tmp_path / "run"
    command = [sys.executable, "train_video.py", "--base", *TINY, f"args.save={save}", f"args.train_data=[{bad_data}]",
               "args.num_workers=0", "args.train_iters=8", "args.log_interval=4", "args.batch_size=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    # one epoch of 16 (8 bad) by iteration 8: 8 bad > 5% of at least 100 draws
    assert error.startswith("error: iteration 8: 8 of 24 samples drawn") and "above data.max_bad_share=0.05" in error, error
    assert "scripts/check_dataset.py" in error and "empty_file" in error
    assert "Traceback" not in result.stderr
    assert not (save / "latest").exists()


def test_data_section_keys_and_share_are_checked(tmp_path, bad_data):
    from satvideo.config import ConfigError, load_config
    from satvideo.data.sources import build_dataset
    from satvideo.training.guards import BadDataGuard

    config = load_config(TINY, ["data.max_bad_shar=0.1"])
    with pytest.raises(ConfigError, match="unknown key data.max_bad_shar"):
        build_dataset(config, [str(bad_data)], "args.train_data")
    with pytest.raises(ConfigError, match=r"data.max_bad_share=1.5: expected a share between 0 and 1"):
        BadDataGuard(1.5)
    guard = BadDataGuard(0.05)
    guard.after_window(10, good=95, bad={"empty_file": 5})  # 5 of 100: at the limit, not above
    with pytest.raises(Exception, match=r"6 of 101 samples .* empty_file 6"):
        guard.after_window(20, good=0, bad={"empty_file": 1})


def test_missing_captions_can_train_unconditionally_as_the_original(bad_data):
    dataset = SFTDataset(str(bad_data), **PARAMS, missing_caption="unconditional")
    position = sorted(BAD_SAMPLES).index("bad_no_label") + 8
    item = dataset[position]
    assert item["txt"] == "" and item["skipped"].sum() == 0
    with pytest.raises(ValueError, match=r"data.params.missing_caption='drop': expected one of \('skip', 'unconditional'\)"):
        SFTDataset(str(bad_data), **PARAMS, missing_caption="drop")
