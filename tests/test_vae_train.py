"""`python -m satvideo.vae.train`: every flag checked before any work, one-line errors, no silent overwrite, no
non-finite run saved, and a checkpoint and overlay that are never left as a mismatched pair. Runs are tiny (8x8
single frames, a few steps) and in-process, except those that prove the command line itself."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import satvideo.vae.train as train
from satvideo.cli import run_entrypoint
from satvideo.config import TrainingError, instantiate_from_config
from satvideo.data.toy import make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
VAE_YAML = ROOT / "configs/tiny/vae.yaml"
TINY_RUN = ["--config", str(VAE_YAML), "--size", "8", "--frames", "1", "--batch-size", "1", "--log-every", "1000"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae_train") / "toy"
    make_toy_dataset(folder, num=2, size=32, frames=9)
    return folder


@pytest.fixture
def outputs(tmp_path) -> tuple[Path, Path]:
    """An earlier run's checkpoint and overlay, with contents to compare byte for byte."""
    out, overlay = tmp_path / "run" / "3d-vae.pt", tmp_path / "run" / "vae.yaml"
    out.parent.mkdir()
    out.write_bytes(b"earlier weights")
    overlay.write_text("model:\n  scale_factor: 0.5\n")
    return out, overlay


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of the command run as `python -m satvideo.vae.train` runs it."""
    monkeypatch.setattr(sys, "argv", ["train", *args])
    try:
        run_entrypoint(train.main)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- bad input: one line naming the flag, before the data or the model is loaded --------------------------------

def test_flag_errors_are_one_line_and_come_before_any_work(toy, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("data or model loaded before the flags were checked")

    monkeypatch.setattr(train, "load_clips", no_work)
    monkeypatch.setattr(train, "instantiate_from_config", no_work)
    out = tmp_path / "out" / "3d-vae.pt"
    (tmp_path / "empty" / "videos").mkdir(parents=True)
    garbage = write(tmp_path / "garbage.yaml", "model: [1\n")
    no_model = write(tmp_path / "no_model.yaml", "args:\n  seed: 1\n")
    no_levels = write(tmp_path / "no_levels.yaml",
                      "model:\n  first_stage_config:\n    target: satvideo.vae.VideoAutoencoder\n")
    no_weights = OmegaConf.load(VAE_YAML)
    no_weights.model.first_stage_config.params.ckpt_path = str(tmp_path / "nowhere.pt")
    no_weights_yaml = write(tmp_path / "no_weights.yaml", OmegaConf.to_yaml(no_weights))
    a_file = write(tmp_path / "a_file", "")
    temporal = {}
    for times in (2, 3):
        config = OmegaConf.load(VAE_YAML)
        for part in ("encoder_config", "decoder_config"):
            config.model.first_stage_config.params[part].params.temporal_compress_times = times
        temporal[times] = write(tmp_path / f"temporal_{times}.yaml", OmegaConf.to_yaml(config))
    cases = [
        (["--data", str(tmp_path / "missing")], f"--data {tmp_path / 'missing'}: no such folder"),
        (["--data", str(tmp_path / "empty")],
         f"--data {tmp_path / 'empty'}: no .mp4 files found under {tmp_path / 'empty' / 'videos'}"),
        (["--config", str(tmp_path / "missing.yaml")], f"--config: config file not found: {tmp_path / 'missing.yaml'}"),
        (["--config", str(garbage)],
         f"--config: cannot parse config file {garbage}: did not find expected ',' or ']' (line 2, column 1)"),
        (["--config", str(no_model)],
         f"--config {no_model}: no model.first_stage_config (give the VAE's config, e.g. configs/tiny/vae.yaml)"),
        (["--config", str(no_levels)], f"--config {no_levels}: model.first_stage_config.params.encoder_config.params."
                                       "ch_mult=None: expected a list of channel multipliers"),
        (["--config", str(no_weights_yaml)], f"--config {no_weights_yaml}: model.first_stage_config.params.ckpt_path "
                                             f"{tmp_path / 'nowhere.pt'} not found"),
        (["--out", str(tmp_path)], f"--out {tmp_path} is a folder; give a file path"),
        (["--out", str(a_file / "3d-vae.pt")], f"--out {a_file / '3d-vae.pt'} lies below the file {a_file}; give a file path"),
        (["--overlay", str(tmp_path)], f"--overlay {tmp_path} is a folder; give a file path"),
        (["--overlay", str(out)], f"--overlay {out} is --out too; the checkpoint and the YAML need a file each"),
        (["--batch-size", "0"], "--batch-size=0: expected a whole number >= 1"),
        (["--log-every", "0"], "--log-every=0: expected a whole number >= 1"),
        (["--iters", "0"], "--iters=0: expected a whole number >= 1"),
        (["--iters", "-3"], "--iters=-3: expected a whole number >= 1"),
        (["--size", "30"], f"--size=30: expected a multiple of 8 > 0 (the spatial compression of the VAE in --config "
                           f"{VAE_YAML})"),
        (["--frames", "8"], "--frames=8: expected 8k+1 frames (1, 9, 17, ...): with 4x temporal compression the VAE "
                            "decodes 4k+1 frames with odd k to 4k+4"),
        (["--frames", "5"], "--frames=5: expected 8k+1 frames (1, 9, 17, ...): with 4x temporal compression the VAE "
                            "decodes 4k+1 frames with odd k to 4k+4"),
        (["--config", str(temporal[2]), "--frames", "7"], "--frames=7: expected 4k+1 frames (1, 5, 9, ...): with 2x "
                                                          "temporal compression the VAE decodes 2k+1 frames with odd k "
                                                          "to 2k+2"),
        (["--config", str(temporal[3])], f"--config {temporal[3]}: model.first_stage_config.params.encoder_config."
                                         "params.temporal_compress_times=3: expected a power of 2"),
        (["--fps", "0"], "--fps=0: expected a number > 0"),
        (["--seed", "-1"], "--seed=-1: expected a whole number from 0 to 4294967295"),
        (["--lr", "nan"], "--lr=nan: expected a finite number > 0"),
        (["--lr", "inf"], "--lr=inf: expected a finite number > 0"),
        (["--lr", "0"], "--lr=0.0: expected a finite number > 0"),
        (["--kl-weight", "nan"], "--kl-weight=nan: expected a finite number >= 0"),
        (["--kl-weight", "-1"], "--kl-weight=-1.0: expected a finite number >= 0"),
    ]
    for args, message in cases:
        # argparse keeps the last of a repeated flag: each case overrides one of a valid command line
        code, stderr = run_in_process(monkeypatch, capsys, "--data", str(toy), "--out", str(out), *TINY_RUN,
                                      "--iters", "1", *args)
        assert one_line_error(code, stderr) == f"error: {message}", args
    assert not out.parent.exists()


def test_the_command_line_gives_one_line_and_the_traceback_with_debug(toy, tmp_path):
    command = [sys.executable, "-m", "satvideo.vae.train", "--data", str(toy), "--out", str(tmp_path / "3d-vae.pt"),
               "--lr", "nan"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert one_line_error(result.returncode, result.stderr) == "error: --lr=nan: expected a finite number > 0"
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert list(tmp_path.iterdir()) == []


# --- existing outputs --------------------------------------------------------------------------------------------

def test_existing_outputs_are_refused_then_replaced_with_overwrite(toy, outputs, monkeypatch, capsys):
    out, overlay = outputs
    earlier = folder_bytes(out.parent)
    command = ["--data", str(toy), "--out", str(out), "--overlay", str(overlay), *TINY_RUN, "--iters", "1"]
    code, stderr = run_in_process(monkeypatch, capsys, *command)
    assert one_line_error(code, stderr) == f"error: --out {out} exists; choose another path or pass --overwrite"
    out.unlink()
    code, stderr = run_in_process(monkeypatch, capsys, *command)
    assert one_line_error(code, stderr) == f"error: --overlay {overlay} exists; choose another path or pass --overwrite"
    out.write_bytes(earlier[out.name])
    assert folder_bytes(out.parent) == earlier

    code, stderr = run_in_process(monkeypatch, capsys, *command, "--overwrite")
    assert code == 0, stderr
    assert sorted(path.name for path in out.parent.iterdir()) == [out.name, overlay.name]  # no partial file left
    saved = torch.load(out, weights_only=True)["state_dict"]
    written = OmegaConf.load(overlay).model
    assert written.first_stage_config.params.ckpt_path == str(out.resolve())
    assert 0 < written.scale_factor < float("inf")
    loaded = instantiate_from_config(OmegaConf.load(VAE_YAML).model.first_stage_config,
                                     ckpt_path=written.first_stage_config.params.ckpt_path)
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())


# --- non-finite runs -------------------------------------------------------------------------------------------

def test_a_nan_run_stops_with_one_line_and_saves_nothing(toy, outputs, tmp_path, monkeypatch, capsys):
    out, overlay = outputs
    earlier = folder_bytes(out.parent)
    diverging = [*TINY_RUN, "--iters", "3", "--lr", "1e30"]
    code, stderr = run_in_process(monkeypatch, capsys, "--data", str(toy), "--out", str(out), "--overlay",
                                  str(overlay), *diverging, "--overwrite")
    assert one_line_error(code, stderr) == ("error: step 2: the loss is nan (mse nan, kl nan); nothing saved (try a "
                                            "lower --lr or --kl-weight)")
    assert folder_bytes(out.parent) == earlier

    fresh = tmp_path / "fresh"
    code, stderr = run_in_process(monkeypatch, capsys, "--data", str(toy), "--out", str(fresh / "3d-vae.pt"),
                                  "--overlay", str(fresh / "vae.yaml"), *diverging)
    assert one_line_error(code, stderr).startswith("error: step 2: the loss is nan")
    assert not fresh.exists()


def test_non_finite_weights_and_scale_factors_are_refused():
    vae = instantiate_from_config(OmegaConf.load(VAE_YAML).model.first_stage_config)
    clips = torch.zeros(1, 3, 1, 8, 8)
    vae.encoder.conv_out.conv.bias.data[0] = float("nan")
    with pytest.raises(TrainingError, match=r"^1 weight tensors are not finite after training \(the first: "
                                            r"encoder\.conv_out\.conv\.bias\); nothing saved"):
        train.check_finite_weights(vae)
    vae.encoder.conv_out.conv.bias.data[0] = 0.0
    train.check_finite_weights(vae)
    vae.encode = lambda batch, sample: torch.zeros(1, 16, 1, 1, 1)
    with pytest.raises(TrainingError, match=r"^the posterior means have standard deviation 0\.0: no finite latent "
                                            r"scale factor; nothing saved$"):
        train.latent_scale_factor(vae, clips)


# --- the checkpoint and its overlay are never a mismatched pair ----------------------------------------------

def test_an_interrupted_save_never_pairs_new_weights_with_the_old_overlay(outputs, monkeypatch):
    """An error at each point of the save stands in for a kill there: what is left is the earlier pair, or a
    checkpoint without an overlay, never the new checkpoint beside the earlier overlay."""
    out, overlay = outputs
    earlier = folder_bytes(out.parent)
    vae = instantiate_from_config(OmegaConf.load(VAE_YAML).model.first_stage_config)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train.torch, "save", killed)  # while the checkpoint is written
        with pytest.raises(KeyboardInterrupt):
            train.save_outputs(vae, str(out), str(overlay), 2.0)
    assert folder_bytes(out.parent) == earlier

    with monkeypatch.context() as patch:
        patch.setattr(train, "write_ckpt_overlay", killed)  # once the checkpoint is replaced
        with pytest.raises(KeyboardInterrupt):
            train.save_outputs(vae, str(out), str(overlay), 2.0)
    assert not overlay.exists() and out.read_bytes() != earlier[out.name]

    train.save_outputs(vae, str(out), str(overlay), 2.0)
    assert OmegaConf.load(overlay).model.scale_factor == 2.0
    assert sorted(path.name for path in out.parent.iterdir()) == [out.name, overlay.name]


@pytest.mark.parametrize("times", [1, 2, 4])
def test_the_frame_rule_accepts_exactly_the_counts_that_reconstruct_to_themselves_among_tk_plus_1(times):
    """Among tk+1 counts (what the data pipeline makes) the rule takes those the VAE gives back as many frames of."""
    config = OmegaConf.load(VAE_YAML).model.first_stage_config
    for part in ("encoder_config", "decoder_config"):
        config.params[part].params.temporal_compress_times = times
    assert train.temporal_compression(config, "vae.yaml") == times
    vae = instantiate_from_config(config).eval()
    accepts, _ = train.training_frames_rule(times)
    for frames in range(1, 4 * times + 2, times):
        with torch.no_grad():
            decoded = vae.decode(vae.encode(torch.randn(1, 3, frames, 8, 8)), chunk_frames=None).shape[2]
        assert accepts(frames) == (decoded == frames), (frames, decoded)


def test_load_clips_takes_each_usable_clip_once_and_no_stand_in(tmp_path):
    from bad_dataset import BAD_SAMPLES, make_bad_dataset

    folder = make_bad_dataset(tmp_path / "data", good=3)
    clips = train.load_clips(str(folder), size=32, frames=9, fps=8)
    assert clips.shape == (3, 3, 9, 32, 32) and len(BAD_SAMPLES) == 8  # 3 good clips of 11 samples
    assert len({clip.numpy().tobytes() for clip in clips}) == 3  # no clip twice
