"""What to sample: requests from a text file, a JSONL file or the terminal, each checked before any weight
loads; and what each request needs from disk (first frames, input clips) at the model's size and frame count."""

from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import decord
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from satvideo.config import FRAMES_4K_PLUS_1, TEXT, ConfigError, Rule, nullable, number_rule, whole_rule
from satvideo.data.frames import resize_cover_center_crop, rgb_pixels

logger = logging.getLogger(__name__)

VAE_SPATIAL = 8  # the CogVideoX VAE's spatial compression
VAE_TEMPORAL = 4
MAX_SIDE = 2048  # pixels: beyond the sizes any CogVideoX family was trained near
MAX_SEED = 2**63 - 1  # a request's videos seed torch.Generator; args.seed is also numpy's, so at most 2**32 - 1
# What each JSONL key's value must be; null means "not given" (ranges that depend on the model are VideoPlan's).
REQUEST_RULES: dict[str, Rule] = {
    "prompt": TEXT, "negative_prompt": nullable(TEXT), "seed": nullable(whole_rule(0, MAX_SEED)),
    "image": nullable(TEXT), "video": nullable(TEXT), "strength": nullable(number_rule(0, 1)),
    "continue_frames": nullable(whole_rule(1)), "num_frames": nullable(FRAMES_4K_PLUS_1)}
REQUEST_KEYS = tuple(REQUEST_RULES)


@dataclass
class VideoRequest:
    """One video to sample. `video` + `strength`: video-to-video; `video` + `continue_frames`: continuation
    (that many latent frames of the clip kept); `num_frames`: output frames (else the run's count)."""

    index: int
    prompt: str
    seed: int
    negative_prompt: str = ""
    image: str | None = None
    video: str | None = None
    strength: float | None = None
    continue_frames: int | None = None
    num_frames: int | None = None

    @property
    def mode(self) -> str:
        if self.strength is not None:
            return "video-to-video"
        return "continuation" if self.continue_frames is not None else "generation"


def read_text(path: str, key: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} " + ("is a folder, not a file" if Path(path).is_dir() else "does not exist"))
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the first prompt
    except UnicodeDecodeError as error:
        raise ConfigError(f"{key}: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error


def read_prompts(path: str, key: str = "args.input_file") -> list[str]:
    """One prompt per line (\n, \r\n or \r; not the other breaks str.splitlines knows, such as U+2028, which a
    prompt may hold); blank lines and lines starting with '#' are skipped."""
    lines = (line.strip() for line in read_text(path, key).split("\n"))  # read_text reads \r\n and \r as \n
    return [line for line in lines if line and not line.startswith("#")]


def warn_of_long_prompts(requests: list[VideoRequest], tokenizer: tuple | None) -> None:
    """A warning for each prompt or negative prompt longer than T5 reads (`tokenizer`: the conditioner's tokenizer
    and max_length, as caption_tokenizer gives them): its tokens past max_length are dropped, as in the original."""
    if tokenizer is None:
        return
    tokenize, max_length = tokenizer
    for request in requests:
        for kind, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            count = len(tokenize(text).input_ids) if text else 0
            if count > max_length:
                logger.warning("request %d (%r): its %s is %d tokens long; T5 reads the first %d, the rest has no "
                               "effect", request.index, request.prompt[:40], kind, count, max_length)


def interactive_prompts(stream: TextIO | None = None) -> Iterator[str]:
    """Prompts typed one per line (on stdin by default), until end of input or an empty line."""
    stream = stream or sys.stdin
    while True:
        print("prompt> ", end="", file=sys.stderr, flush=True)
        prompt = stream.readline().strip()
        if not prompt:
            return
        yield prompt


def request_from_line(line: str, index: int, seed: int) -> VideoRequest:
    """A text-file line: `prompt` or `prompt@@image.png` (image-to-video)."""
    prompt, _, image = line.partition("@@")
    return VideoRequest(index=index, prompt=prompt.strip(), seed=seed, image=image.strip() or None)


def read_jsonl_requests(path: str, seed: int, seeds_per_request: int = 1) -> list[VideoRequest]:
    """One JSON object per line with `prompt` and optionally the other REQUEST_KEYS; request i's seed defaults to
    seed + i * seeds_per_request (its videos take that seed and the next ones)."""
    requests = []
    for number, line in enumerate(read_text(path, "args.input_file").split("\n"), start=1):  # not at U+2028
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not a JSON object ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ConfigError(f"{where}: needs a non-empty \"prompt\" string")
        for key, value in record.items():
            if key not in REQUEST_KEYS:
                close = difflib.get_close_matches(key, REQUEST_KEYS, n=1)
                raise ConfigError(f"{where}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
            test, expected = REQUEST_RULES[key]
            if not test(value):
                raise ConfigError(f"{where}: \"{key}\": {json.dumps(value)}: expected {expected}")
        index = len(requests)
        given = {key: value for key, value in record.items() if value is not None}
        first_seed = given.pop("seed", seed + index * seeds_per_request)
        if first_seed + seeds_per_request - 1 > MAX_SEED:  # so that every sidecar's seed can be asked for again
            raise ConfigError(f"{where}: \"seed\": {first_seed}: its {seeds_per_request} videos (args.num_samples) "
                              f"would take seeds up to {first_seed + seeds_per_request - 1}, above {MAX_SEED}")
        requests.append(VideoRequest(index=index, seed=first_seed, **given))
    return requests


def read_requests(args) -> list[VideoRequest]:
    """The requests of `args.input_file` (.jsonl: JSON lines, else one prompt per line); never empty."""
    if not args.input_file:
        raise ConfigError("args.input_file: give a prompt file (one per line, or .jsonl) or set args.input_type=cli")
    if str(args.input_file).endswith(".jsonl"):
        requests = read_jsonl_requests(args.input_file, args.seed, args.num_samples)
    else:
        requests = [request_from_line(line, i, args.seed + i * args.num_samples)
                    for i, line in enumerate(read_prompts(args.input_file))]
    if not requests:
        raise ConfigError(f"args.input_file: {args.input_file} holds no prompt")
    return requests


def sampling_dtype(args) -> torch.dtype:
    if args.bf16 and args.fp16:
        raise ConfigError("args.bf16 and args.fp16 are both set: choose one")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def read_image(path: str) -> Image.Image:
    """An image file of any mode as RGB, decoded whole (a truncated file fails here, not mid-run)."""
    with Image.open(path) as image:
        return Image.fromarray(rgb_pixels(image))


def load_first_frame(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1], resized to cover (H, W) and centre-cropped."""
    if not Path(path).is_file():
        raise ConfigError(f"image for image-to-video not found: {path}")
    image = torch.from_numpy(np.asarray(read_image(path)).copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, h, w]
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
    image = read_image(path)
    height, width = size_from_image(image.height, image.width)
    resized = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_clip(path: str, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first `num_frames` frames of a video file -> [T, 3, H, W] in [-1, 1], resized to cover and cropped."""
    reader = decord.VideoReader(path)
    frames = torch.from_numpy(reader.get_batch(list(range(num_frames))).asnumpy()).permute(0, 3, 1, 2).float()
    return resize_cover_center_crop(frames, (height, width)).round().clamp(0, 255) / 127.5 - 1


def latent_frame_count(args, network) -> int:
    """Latent frames to decode. For 1.5 models (temporal patch > 1) `args.sampling_num_frames` counts, as in the
    original, the latent frames sampled, including the first one that decoding drops (22 -> 81 frames)."""
    patch_t = temporal_patch(network)
    if args.sampling_num_frames is None:
        return (network.num_frames - 1) // network.time_compressed_rate + 1
    if patch_t == 1:
        return args.sampling_num_frames
    if args.sampling_num_frames % patch_t:
        raise ConfigError(f"args.sampling_num_frames={args.sampling_num_frames}: 1.5 models sample a multiple of "
                          f"{patch_t} latent frames (22 for 5 s, 42 for 10 s)")
    return args.sampling_num_frames - 1


def temporal_patch(network) -> int:
    return 1 if isinstance(network.patch_size, int) else network.patch_size[0]


def check_frame_count(latent_frames: int, network, key: str) -> None:
    """The counts the original documents: 8N+1 output frames for 1.0 models, 16N+1 for 1.5."""
    frames = VAE_TEMPORAL * (latent_frames - 1) + 1
    period = 16 if temporal_patch(network) > 1 else 8
    if latent_frames < 1 or (frames - 1) % period:
        raise ConfigError(f"{key}: {frames} output frames ({latent_frames} latent); this family needs {period}N+1 "
                          f"frames (e.g. {period * 3 + 1} or {period * 6 + 1})")


class VideoPlan:
    """The latent shape and conditioning of each request, from `args` and the network config; `check` looks
    at every request (its files included) before any weight loads."""

    def __init__(self, args, network: DictConfig):
        self.args, self.network = args, network
        self.latent_frames = latent_frame_count(args, network)
        check_frame_count(self.latent_frames, network, "args.sampling_num_frames")
        self.height, self.width = args.sampling_image_size or (network.latent_height * VAE_SPATIAL,
                                                               network.latent_width * VAE_SPATIAL)
        self.check_size(self.height, self.width, "args.sampling_image_size")
        # 1.5-I2V without an explicit size takes it from each image, as the original does
        self.size_follows_image = (args.image2video and temporal_patch(network) > 1 and not args.sampling_image_size)
        self.check_learned_table(self.latent_frames, "args.sampling_num_frames and args.sampling_image_size")

    def check_size(self, height: int, width: int, key: str) -> None:
        multiple = VAE_SPATIAL * (self.network.patch_size if isinstance(self.network.patch_size, int)
                                  else self.network.patch_size[-1])
        if height % multiple or width % multiple or not (multiple <= height <= MAX_SIDE and multiple <= width <= MAX_SIDE):
            raise ConfigError(f"{key}={[height, width]}: both must be multiples of {multiple} between {multiple} "
                              f"and {MAX_SIDE}")

    def check_learned_table(self, latent_frames: int, key: str) -> None:
        """A learnable position table (5B-I2V) is tied to its configured grid: that size, and at most its frames."""
        pos = (self.network.get("modules", {}).get("pos_embed_config") or {}).get("params") or {}
        if not pos.get("learnable_pos_embed"):
            return
        table_frames = (self.network.num_frames - 1) // self.network.time_compressed_rate + 1
        size = [self.network.latent_height * VAE_SPATIAL, self.network.latent_width * VAE_SPATIAL]
        if [self.height, self.width] != size or latent_frames > table_frames:
            raise ConfigError(f"{key}: {VAE_TEMPORAL * (latent_frames - 1) + 1} frames at {self.height}x{self.width}; "
                              f"this model's learnable position table (pos_embed_config.params.learnable_pos_embed) "
                              f"covers {size[0]}x{size[1]} and at most {self.network.num_frames} frames")

    def latents_of(self, request: VideoRequest) -> int:
        """The request's latent frames: the run's, or from its num_frames (4k+1 by REQUEST_RULES)."""
        if request.num_frames is None:
            return self.latent_frames
        return (request.num_frames - 1) // VAE_TEMPORAL + 1

    def check(self, request: VideoRequest) -> None:
        """One-line ConfigErrors for everything a request needs, files included."""
        where = f"request {request.index} ({request.prompt[:40]!r})"
        if not request.prompt:
            raise ConfigError(f"{where}: empty prompt")
        if self.args.image2video and not request.image:
            raise ConfigError(f"{where}: args.image2video needs an image ('prompt@@image.png' or \"image\" in JSONL)")
        if request.image and not self.args.image2video:
            raise ConfigError(f"{where}: an image is given but args.image2video is false (a text-to-video model)")
        latent_frames = self.latents_of(request)
        check_frame_count(latent_frames, self.network, f"{where}: num_frames")
        self.check_learned_table(latent_frames, f"{where}: num_frames")
        if request.image:
            try:
                image = read_image(request.image)
                size = image.height, image.width
            except (OSError, ValueError, UnidentifiedImageError) as error:
                raise ConfigError(f"{where}: image {request.image} cannot be read ({error})") from error
            if self.size_follows_image:
                self.check_size(*size_from_image(*size), f"{where}: the size derived from {request.image}")
        if request.strength is not None and request.continue_frames is not None:
            raise ConfigError(f"{where}: give either strength (video-to-video) or continue_frames, not both")
        if (request.strength is not None or request.continue_frames is not None) and not request.video:
            raise ConfigError(f"{where}: strength and continue_frames need a \"video\"")
        if request.video:
            if request.strength is None and request.continue_frames is None:
                raise ConfigError(f"{where}: a video needs strength (video-to-video) or continue_frames (continuation)")
            # continue_frames >= 1 by REQUEST_RULES
            if request.continue_frames is not None and request.continue_frames >= latent_frames:
                raise ConfigError(f"{where}: continue_frames={request.continue_frames} must be between 1 and "
                                  f"{latent_frames - 1} latent frames")
            needed = self.clip_frames(request, latent_frames)
            try:
                available = len(decord.VideoReader(request.video))
            except (RuntimeError, decord.DECORDError) as error:
                raise ConfigError(f"{where}: video {request.video} cannot be decoded ({error})") from error
            if available < needed:
                raise ConfigError(f"{where}: video {request.video} has {available} frames, {needed} are needed")

    @staticmethod
    def clip_frames(request: VideoRequest, latent_frames: int) -> int:
        """Frames read from the input clip: the whole output (video-to-video) or the kept latent frames."""
        kept = latent_frames if request.strength is not None else request.continue_frames
        return VAE_TEMPORAL * (kept - 1) + 1

    def inputs(self, request: VideoRequest, num_samples: int) -> tuple[tuple[int, int, int, int], torch.Tensor | None,
                                                                        torch.Tensor | None]:
        """(latent shape (T', C, h, w), first frames [N, 3, H, W] or None, input clip [T, 3, H, W] or None)."""
        height, width = self.height, self.width
        first_frames = None
        if request.image:
            image = (load_first_frame_at_its_aspect(request.image) if self.size_follows_image
                     else load_first_frame(request.image, height, width))
            first_frames = image[None].expand(num_samples, -1, -1, -1)
            height, width = image.shape[-2:]
        latent_frames = self.latents_of(request)
        clip = None
        if request.video:
            clip = load_clip(request.video, self.clip_frames(request, latent_frames), height, width)
        shape = (latent_frames, self.args.latent_channels, height // VAE_SPATIAL, width // VAE_SPATIAL)
        return shape, first_frames, clip
