"""What sampling needs besides the engine: prompt sources, the latent shape and first frame of each video,
and output files. Used by `sample_video.py` and by validation during training."""

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import imageio.v3 as iio
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from satvideo.checkpoint import lora_metadata
from satvideo.config import ConfigError
from satvideo.data.sft import resize_cover_center_crop
from satvideo.data.video import write_mp4

VAE_SPATIAL = 8  # the CogVideoX VAE's spatial compression
LORA_MIXIN = "sat.model.finetune.lora2.LoraMixin"

MANIFEST_NAME = "manifest.jsonl"
MANIFEST_KEYS = ("file", "prompt", "seed")


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def interactive_prompts(stream: TextIO | None = None) -> Iterator[str]:
    """Prompts typed one per line (on stdin by default), until end of input or an empty line."""
    stream = stream or sys.stdin
    while True:
        print("prompt> ", end="", file=sys.stderr, flush=True)
        prompt = stream.readline().strip()
        if not prompt:
            return
        yield prompt


def save_video(frames: torch.Tensor, path: str, fps: int) -> None:
    """Write frames [T, 3, H, W] in [-1, 1] as an h264 mp4 (H and W must be even)."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    write_mp4(pixels.permute(0, 2, 3, 1).cpu().numpy(), path, fps)  # [T, H, W, 3]


def slugify(prompt: str, max_length: int = 60) -> str:
    """A file-name-safe form of the prompt: lower-case words joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "video"


def write_manifest_line(output_dir: str, record: dict) -> None:
    """Append one JSON record to output_dir/manifest.jsonl: file (relative to output_dir), prompt,
    seed, and any further keys."""
    missing = [key for key in MANIFEST_KEYS if key not in record]
    if missing:
        raise ValueError(f"manifest record lacks {missing}: {record}")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / MANIFEST_NAME, "a", encoding="utf-8") as manifest:
        manifest.write(json.dumps(record) + "\n")


def sampling_dtype(args) -> torch.dtype:
    if args.bf16 and args.fp16:
        raise ConfigError("args.bf16 and args.fp16 are both set: choose one")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def load_first_frame(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1], resized to cover (H, W) and centre-cropped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image for image-to-video not found: {path}")
    image = torch.from_numpy(iio.imread(path)[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, h, w]
    return resize_cover_center_crop(image[None], (height, width))[0]


def nearest_multiple_of_16(value: float) -> int:
    lower = int(value // 16) * 16
    return lower if abs(value - lower) < abs(value - (lower + 16)) else lower + 16


def size_from_image(image_height: int, image_width: int, short_side: int = 768) -> tuple[int, int]:
    """CogVideoX 1.5-I2V's output size, as the original derives it: the short side 768 px, the long side
    keeping the image's aspect ratio, to the nearest multiple of 16 (1920x1080 -> 768x1360)."""
    if image_height < image_width:
        return short_side, nearest_multiple_of_16(image_width / image_height * short_side)
    return nearest_multiple_of_16(image_height / image_width * short_side), short_side


def load_first_frame_at_its_aspect(path: str) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1] at size_from_image, resized without cropping (Lanczos, as the original)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image for image-to-video not found: {path}")
    image = Image.open(path).convert("RGB")
    height, width = size_from_image(image.height, image.width)
    resized = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 127.5 - 1


def latent_frame_count(args, network) -> int:
    """Latent frames to decode. For 1.5 models (temporal patch > 1) `args.sampling_num_frames` counts, as in the
    original, the latent frames sampled, including the first one that decoding drops (22 -> 81 frames)."""
    patch_t = network.patch_size[0] if not isinstance(network.patch_size, int) else 1
    if args.sampling_num_frames is None:
        return (network.num_frames - 1) // network.time_compressed_rate + 1
    if args.sampling_num_frames < 1:
        raise ConfigError(f"args.sampling_num_frames={args.sampling_num_frames}: give a positive number of latent frames")
    if patch_t == 1:
        return args.sampling_num_frames
    if args.sampling_num_frames % patch_t:
        raise ConfigError(f"args.sampling_num_frames={args.sampling_num_frames}: 1.5 models sample a multiple of "
                          f"{patch_t} latent frames (22 for 5 s, 42 for 10 s)")
    return args.sampling_num_frames - 1


class VideoPlan:
    """The latent shape and conditioning frame of each video, from `args` and the network config."""

    def __init__(self, args, network: DictConfig):
        self.args = args
        self.latent_frames = latent_frame_count(args, network)
        self.height, self.width = args.sampling_image_size or (network.latent_height * VAE_SPATIAL,
                                                               network.latent_width * VAE_SPATIAL)
        patch = network.patch_size if isinstance(network.patch_size, int) else network.patch_size[-1]
        if self.height % (VAE_SPATIAL * patch) or self.width % (VAE_SPATIAL * patch):
            raise ConfigError(f"args.sampling_image_size={[self.height, self.width]}: both must be multiples of "
                              f"{VAE_SPATIAL * patch}")
        # 1.5-I2V without an explicit size takes it from each image, as the original does
        self.size_follows_image = (args.image2video and not isinstance(network.patch_size, int)
                                   and not args.sampling_image_size)

    def video(self, line: str, index: int, num_samples: int) -> tuple[str, tuple[int, int, int, int], torch.Tensor | None]:
        """A prompt line (`prompt` or `prompt@@image.png`) -> (prompt, latent shape (T', C, h, w), first frames)."""
        prompt, _, image_path = line.partition("@@")
        first_frames = None
        if self.args.image2video:
            if not image_path:
                raise ConfigError(f"args.image2video: prompt {index} has no '@@image_path' part: {line!r}")
            if self.size_follows_image:
                image = load_first_frame_at_its_aspect(image_path.strip())
            else:
                image = load_first_frame(image_path.strip(), self.height, self.width)
            first_frames = image[None].expand(num_samples, -1, -1, -1)
        height, width = first_frames.shape[-2:] if first_frames is not None else (self.height, self.width)
        shape = (self.latent_frames, self.args.latent_channels, height // VAE_SPATIAL, width // VAE_SPATIAL)
        return prompt.strip(), shape, first_frames


def add_lora_from_checkpoint(config: DictConfig, checkpoint: str) -> None:
    """An adapter-only checkpoint needs LoRA layers: add `lora_config` (rank, alpha) from its metadata when the
    model config has none; a config whose rank differs is an error."""
    metadata = lora_metadata(checkpoint)
    if metadata is None:
        return
    modules = config.model.network_config.params.modules
    if "lora_config" not in modules:
        modules.lora_config = {"target": LORA_MIXIN, "params": {"r": metadata["r"], "lora_alpha": metadata["lora_alpha"]}}
    elif modules.lora_config.params.get("r") != metadata["r"]:
        raise ConfigError(f"model.network_config.params.modules.lora_config.params.r={modules.lora_config.params.get('r')}"
                          f" differs from the rank {metadata['r']} of the adapters in {checkpoint}")
