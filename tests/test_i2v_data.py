"""Image-to-video data end to end: a manifest's first-frame images condition a tiny I2V training run, whose
checkpoint then samples a video from a prompt and an image."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from satvideo.data.health import BadSample
from satvideo.data.manifest import ManifestDataset
from satvideo.data.toy import make_toy_dataset
from satvideo.data.video import read_mp4
from test_training import run, train

I2V = ("model.noised_image_input=true", "model.noised_image_dropout=0.05",
       "model.network_config.params.in_channels=32")


@pytest.fixture(scope="module")
def i2v_manifest(tmp_path_factory):
    """8 toy clips listed in a manifest, each with its first frame saved as a PNG."""
    root = tmp_path_factory.mktemp("i2v")
    written = make_toy_dataset(root / "clips", num=8, size=32, frames=9, fps=8, seed=4)
    lines = []
    for video, caption in written:
        image = root / "frames" / f"{video.stem}.png"
        image.parent.mkdir(exist_ok=True)
        Image.fromarray(read_mp4(video)[0][0]).save(image)
        lines.append(json.dumps({"video": f"clips/videos/{video.name}", "caption": caption,
                                 "image": f"frames/{image.name}"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def test_manifest_images_are_the_conditioning_frame(i2v_manifest):
    dataset = ManifestDataset(str(i2v_manifest), video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)
    item = dataset[2]
    assert item["image"].shape == (3, 32, 32)
    # the PNG holds the decoded first frame: both resized alike, they agree to the last uint8 level
    assert (item["image"] - item["mp4"][0]).abs().max() < 1.5 / 127.5
    (i2v_manifest.parent / "frames" / "00003.png").write_text("not a png")
    with pytest.raises(BadSample, match=r"00003.mp4: the conditioning image is missing or cannot be decoded") as error:
        dataset.load(3)
    assert error.value.reason == "bad_image"
    assert dataset[3]["skipped"].sum() == 1  # the broken image is passed over like a broken video


@pytest.mark.slow
def test_tiny_i2v_training_and_sampling_end_to_end(tmp_path, i2v_manifest):
    save = tmp_path / "run"
    output = train(str(save), str(i2v_manifest), "args.train_iters=4", "args.log_interval=2", "args.save_interval=4",
                   "args.batch_size=2", *I2V)
    assert "iteration 4 | loss" in output
    image = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), (40, 200, 60), dtype=np.uint8)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a green square moving right@@{image}\n")
    out_dir = tmp_path / "videos"
    run([sys.executable, "sample_video.py", "--base", "configs/tiny/model.yaml", "configs/tiny/vae.yaml",
         "configs/tiny/sample.yaml", *I2V, "args.image2video=true", f"args.load={save}", f"args.input_file={prompts}",
         f"args.output_dir={out_dir}", "model.sampler_config.params.num_steps=4",
         "model.sampler_config.params.guider_config.params.num_steps=4"])
    record = json.loads((out_dir / "manifest.jsonl").read_text().splitlines()[0])
    video = out_dir / record["file"]
    assert str(image) in json.dumps(json.loads(video.with_suffix(".json").read_text()))  # the record names the image
    frames, _ = read_mp4(video)
    assert frames.shape == (9, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(frames).float()).all()


def test_first_frames_of_every_image_mode_load_as_rgb_and_a_truncated_one_is_refused_at_the_check(tmp_path):
    from satvideo.config import ConfigError, args_namespace, load_config
    from satvideo.sampling import VideoPlan, VideoRequest
    from satvideo.sampling.inputs import load_first_frame

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    images = {"rgb.png": rgb, "grey.png": grey, "bw.png": rgb.convert("1"), "grey_alpha.png": rgb.convert("LA"),
              "rgba.png": rgb.convert("RGBA"), "palette.png": rgb.convert("P"), "cmyk.jpg": rgb.convert("CMYK"),
              "grey16.png": Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)}
    for name, image in images.items():
        image.save(tmp_path / name)
    config = load_config(["configs/tiny/model.yaml", "configs/tiny/vae.yaml", "configs/tiny/sample.yaml"],
                         [*I2V, "args.image2video=true", "args.sampling_image_size=[32,32]"])
    plan = VideoPlan(args_namespace(config), config.model.network_config.params)
    frames = {}
    for index, name in enumerate(images):
        request = VideoRequest(index=index, prompt="a square", seed=0, image=str(tmp_path / name))
        plan.check(request)
        frames[name] = load_first_frame(str(tmp_path / name), 32, 32)
        assert frames[name].shape == (3, 32, 32), name
    for name in ("grey.png", "bw.png", "grey_alpha.png", "grey16.png"):  # grey: three equal channels
        assert torch.equal(frames[name][0], frames[name][1]) and torch.equal(frames[name][1], frames[name][2]), name
    assert torch.equal(frames["grey16.png"], frames["grey.png"])  # 16 bits brought to 8, not clipped
    assert torch.equal(frames["rgba.png"], frames["rgb.png"])
    assert (frames["cmyk.jpg"] - frames["rgb.png"]).abs().mean() < 0.1  # converted, not read as C, M, Y
    rgb.save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])  # its header still verifies
    with pytest.raises(ConfigError, match=r"^request 3 \('a square'\): image .*truncated.jpg cannot be read "
                                          r"\(image file is truncated"):
        plan.check(VideoRequest(index=3, prompt="a square", seed=0, image=str(tmp_path / "truncated.jpg")))
