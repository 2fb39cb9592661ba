"""scripts/vae.py: the VAE alone, run as a command. Its contract is that encode and decode give what
VideoAutoencoder.encode / decode give in-process for the same weights and frames; the VAE here has random
weights, saved as a `3d-vae.pt` and loaded through model.first_stage_config.params.ckpt_path as real weights are.
(A few hundred training steps of the tiny VAE take over 30 s on two CPU cores: too long for this test.)"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import script_error
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from satvideo.config import instantiate_from_config
from satvideo.data.toy import render_toy_video
from satvideo.data.video import read_mp4, write_mp4
from satvideo.sampling.inputs import load_clip
from satvideo.sampling.outputs import save_video
from satvideo.vae import VideoAutoencoder

ROOT = Path(__file__).resolve().parents[1]
VAE_YAML = ROOT / "configs/tiny/vae.yaml"
FRAMES, SIZE, FPS = 9, 32, 8


@dataclass
class Setup:
    folder: Path
    clip: Path
    vae: VideoAutoencoder
    base: list[str]  # --base: the tiny VAE config and the override that loads the saved weights


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    folder = tmp_path_factory.mktemp("vae_tool")
    clip = folder / "clip.mp4"
    write_mp4(render_toy_video("red", "square", "right", SIZE, FRAMES, np.random.default_rng(0)), clip, FPS)
    torch.manual_seed(0)
    vae = instantiate_from_config(OmegaConf.load(VAE_YAML).model.first_stage_config).eval()
    torch.save({"state_dict": vae.state_dict()}, folder / "3d-vae.pt")
    weights = f"model.first_stage_config.params.ckpt_path={folder / '3d-vae.pt'}"
    return Setup(folder, clip, vae, [str(VAE_YAML), weights])


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "vae.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def succeeds(*args: str) -> str:
    result = run_tool(*args, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return result.stdout


def decoded_through_mp4(frames: torch.Tensor, path: Path) -> np.ndarray:
    """Frames [T, 3, H, W] in [-1, 1] as written by the tool and read back (uint8 [T, H, W, 3])."""
    save_video(frames, str(path), FPS)
    return read_mp4(path)[0]


@torch.no_grad()
def test_round_trip_equals_the_autoencoder_in_process(setup):
    latents_file, video_file = setup.folder / "clip.safetensors", setup.folder / "clip_decoded.mp4"
    summary = succeeds("encode", str(setup.clip), str(latents_file), "--base", *setup.base)
    assert " s (peak resident set " in summary and "GB)" in summary
    succeeds("decode", str(latents_file), str(video_file), "--base", *setup.base)

    frames = load_clip(str(setup.clip), FRAMES, SIZE, SIZE)  # [T, 3, H, W] in [-1, 1]
    expected = setup.vae.encode(frames.permute(1, 0, 2, 3)[None], sample=False)[0]  # unscaled, [C, T', h, w]
    latents = load_file(latents_file)["latents"]
    assert latents.shape == (16, 3, SIZE // 8, SIZE // 8)
    assert torch.equal(latents, expected)
    with safe_open(str(latents_file), framework="pt") as file:
        metadata = file.metadata()
    assert (metadata["source"], metadata["frames"], json.loads(metadata["size"]), metadata["fps"],
            metadata["posterior"]) == (str(setup.clip), str(FRAMES), [SIZE, SIZE], str(FPS), "mean")
    assert json.loads(metadata["config"]) == [str(VAE_YAML)]

    decoded, fps = read_mp4(video_file)
    assert decoded.shape == read_mp4(setup.clip)[0].shape == (FRAMES, SIZE, SIZE, 3) and fps == FPS
    in_process = setup.vae.decode(expected[None], chunk_frames=2)[0].permute(1, 0, 2, 3)
    assert np.array_equal(decoded, decoded_through_mp4(in_process, setup.folder / "in_process.mp4"))


@torch.no_grad()
def test_sample_draws_from_the_posterior_with_the_seed(setup):
    latents_file = setup.folder / "sampled.safetensors"
    succeeds("encode", str(setup.clip), str(latents_file), "--base", *setup.base, "--sample", "--seed", "3")
    video = load_clip(str(setup.clip), FRAMES, SIZE, SIZE).permute(1, 0, 2, 3)[None]
    torch.manual_seed(3)
    expected = setup.vae.encode(video, sample=True)[0]
    assert torch.equal(load_file(latents_file)["latents"], expected)
    assert not torch.equal(expected, setup.vae.encode(video, sample=False)[0])


@torch.no_grad()
def test_tiled_decode_is_the_autoencoders_and_within_the_stated_tolerance_of_untiled(setup):
    z = torch.randn(16, 1, 24, 16, generator=torch.Generator().manual_seed(0))  # two tiles of 16 latent pixels
    latents_file, video_file = setup.folder / "random.safetensors", setup.folder / "tiled.mp4"
    save_file({"latents": z}, str(latents_file))  # no metadata: 8 fps
    succeeds("decode", str(latents_file), str(video_file), "--base", *setup.base, "--tile", "16", "--overlap", "8")
    decoded, fps = read_mp4(video_file)
    tiled = setup.vae.decode_tiled(z[None], chunk_frames=2, tile=16, overlap=8)[0].permute(1, 0, 2, 3)
    assert decoded.shape == (1, 192, 128, 3) and fps == FPS
    assert np.array_equal(decoded, decoded_through_mp4(tiled, setup.folder / "tiled_in_process.mp4"))
    untiled = setup.vae.decode(z[None], chunk_frames=2)[0].permute(1, 0, 2, 3)
    # per-tile GroupNorm statistics: 2.8% relative L2 error here, within the 6% the README states for 16-pixel tiles
    assert (tiled - untiled).norm() / untiled.norm() < 0.05


def fails_with_one_line(*args: str) -> str:
    result = run_tool(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def test_missing_video_is_one_line(setup):
    missing = setup.folder / "missing.mp4"
    last = fails_with_one_line("encode", str(missing), str(setup.folder / "out.safetensors"), "--base", *setup.base)
    assert last == f"error: video {missing} not found"


def test_latents_file_without_latents_is_one_line(setup):
    other = setup.folder / "other.safetensors"
    save_file({"moments": torch.zeros(2)}, str(other))
    last = fails_with_one_line("decode", str(other), str(setup.folder / "out.mp4"), "--base", *setup.base)
    assert last == f"error: {other} has no tensor 'latents' (it holds moments)"


def test_frame_count_not_4k_plus_1_is_refused(setup):
    out = setup.folder / "ten.safetensors"
    last = fails_with_one_line("encode", str(setup.clip), str(out), "--base", *setup.base, "--frames", "10")
    assert "--frames 10" in last and "4k+1" in last and not out.exists()


def test_existing_output_is_refused_without_overwrite(setup):
    taken = setup.folder / "taken.safetensors"
    taken.write_text("earlier")
    last = fails_with_one_line("encode", str(setup.clip), str(taken), "--base", *setup.base)
    assert last == f"error: output {taken} exists; choose another path or pass --overwrite"
    assert taken.read_text() == "earlier"


def test_bad_chunking_and_tiling_options_are_one_line(setup):
    latents_file = setup.folder / "options.safetensors"
    save_file({"latents": torch.zeros(16, 2, 4, 4)}, str(latents_file))
    out = setup.folder / "options.mp4"
    last = fails_with_one_line("decode", str(latents_file), str(out), "--base", *setup.base, "--tile", "4",
                               "--overlap", "8")
    assert last.startswith("error: --tile=4 with --overlap=8: need whole numbers, the tile larger than the overlap")
    last = fails_with_one_line("decode", str(latents_file), str(out), "--base", *setup.base, "--chunk-frames", "3")
    assert last == "error: --chunk-frames must be a positive multiple of 2, got 3"
    last = fails_with_one_line("encode", str(setup.clip), str(setup.folder / "options.safetensors2"), "--base",
                               *setup.base, "--chunk-frames", "6")
    assert last == "error: --chunk-frames must be a positive multiple of 4, got 6"
    assert not out.exists()


@pytest.mark.parametrize("fps", ["0", "-2", "99999999999999999999999"])
def test_fps_out_of_range_is_one_line(setup, fps):
    latents_file, out = setup.folder / "fps.safetensors", setup.folder / "fps.mp4"
    save_file({"latents": torch.zeros(16, 1, 2, 2)}, str(latents_file), metadata={"fps": "12"})
    message = script_error("vae.py", "decode", str(latents_file), str(out), "--base", *setup.base, "--fps", fps)
    assert message == f"--fps {fps}: expected a whole number from 1 to 1000" and not out.exists()


def vae_tool():
    """scripts/vae.py as a module, for checks of its parts in-process."""
    spec = importlib.util.spec_from_file_location("vae_tool", ROOT / "scripts" / "vae.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("recorded, warned", [("12", False), ("0.01", False), ("1000", False), ("0", True),
                                              ("nan", True), ("fast", True), ("1e-9", True), ("1001", True),
                                              (None, True)])
def test_metadata_fps_is_taken_only_when_it_is_from_one_hundredth_to_a_thousand(recorded, warned, caplog):
    metadata = {} if recorded is None else {"fps": recorded}
    assert vae_tool().output_fps("z.safetensors", None, metadata) == (8 if warned else float(recorded))
    found = "has no fps" if recorded is None else f"fps {recorded!r} is not a number from 0.01 to 1000"
    warning = f"z.safetensors: its metadata {found}; writing at 8 fps (--fps sets it)"
    assert [record.getMessage() for record in caplog.records] == ([warning] if warned else [])


@pytest.mark.parametrize("recorded, written", [("12", 12), ("nan", 8)])
def test_decode_writes_at_the_fps_of_the_metadata_or_warns(setup, recorded, written):
    latents_file, out = setup.folder / f"fps_{recorded}.safetensors", setup.folder / f"fps_{recorded}.mp4"
    save_file({"latents": torch.zeros(16, 1, 4, 4)}, str(latents_file), metadata={"fps": recorded})
    result = run_tool("decode", str(latents_file), str(out), "--base", *setup.base, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f" at {written} fps " in result.stdout and read_mp4(out)[1] == written
    warning = f"{latents_file}: its metadata fps 'nan' is not a number from 0.01 to 1000; writing at 8 fps"
    assert (warning in result.stderr) == (recorded == "nan"), result.stderr


def test_outputs_that_cannot_be_written_as_asked_and_a_bad_seed_are_one_line(setup):
    latents_file = setup.folder / "for_avi.safetensors"
    save_file({"latents": torch.zeros(16, 1, 2, 2)}, str(latents_file))
    avi = setup.folder / "video.avi"
    assert script_error("vae.py", "decode", str(latents_file), str(avi), "--base", *setup.base) == (
        f"output {avi}: decode writes an mp4; give a path ending in .mp4")
    copy = setup.folder / "own.mp4"
    copy.write_bytes(Path(setup.clip).read_bytes())
    assert script_error("vae.py", "encode", str(copy), str(copy), "--base", *setup.base, "--overwrite") == (
        f"output {copy} is the input video; give another path")
    assert read_mp4(copy)[0].shape == read_mp4(setup.clip)[0].shape  # untouched
    for seed in ("-1", str(2**70)):
        assert script_error("vae.py", "decode", str(latents_file), str(setup.folder / "s.mp4"), "--base", *setup.base,
                            "--seed", seed) == f"--seed={int(seed)}: expected a whole number from 0 to 4294967295"
    usage = subprocess.run([sys.executable, "scripts/vae.py", "encode", "--help"], capture_output=True, text=True,
                           cwd=ROOT).stdout
    assert "\nusage: vae.py encode VIDEO OUT --base YAML_OR_OVERRIDE [...] [options]\n" in "\n" + usage


@pytest.mark.parametrize("latents, problem", [
    (torch.zeros(16, 0, 4, 4), "has shape [16, 0, 4, 4]; expected [C, T', h, w] with every dimension > 0"),
    (torch.zeros(16, 2, 4, 0), "has shape [16, 2, 4, 0]; expected [C, T', h, w] with every dimension > 0"),
    (torch.tensor([float("nan"), float("inf"), 0.0, 1.0]).repeat(16, 2, 2, 1),
     "holds 128 non-finite values (NaN or inf)"),
])
def test_empty_or_non_finite_latents_are_refused_before_the_vae_is_built(setup, latents, problem):
    latents_file, out = setup.folder / "unusable.safetensors", setup.folder / "unusable.mp4"
    save_file({"latents": latents}, str(latents_file))
    # weights that do not exist: building the VAE would fail with another message
    base = [str(VAE_YAML), f"model.first_stage_config.params.ckpt_path={setup.folder / 'absent.pt'}"]
    message = script_error("vae.py", "decode", str(latents_file), str(out), "--base", *base)
    assert message == f"{latents_file}: tensor 'latents' {problem}" and not out.exists()


def test_an_encode_stopped_while_writing_leaves_nothing_at_the_output(setup, monkeypatch):
    tool = vae_tool()

    def stopped_half_way(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"the first half of a safetensors file")
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "save_file", stopped_half_way)
    out = setup.folder / "stopped" / "clip.safetensors"
    options = argparse.Namespace(video=str(setup.clip), out=str(out), overwrite=False, frames=None, size=None,
                                 chunk_frames=None, sample=False)
    config, files, overrides = tool.load_vae_config(setup.base)
    with pytest.raises(KeyboardInterrupt):
        tool.encode(options, config, files, overrides, torch.device("cpu"), seed=0)
    assert list(out.parent.iterdir()) == []
