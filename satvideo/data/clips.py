"""What every video-caption source shares: frame choice, resize, captions, and passing over bad samples.

A source (SFT folder, JSONL manifest, tar shards) lists its samples and says how to read each one's video bytes,
caption and optional first-frame image; `ClipDataset` turns a sample into an item. A sample that cannot be used
raises `BadSample` inside `load`; `__getitem__` then takes the next sample of the same group (the same bucket,
when buckets are configured) and the item carries the reason the drawn sample was passed over (`health.SKIPPED`;
a stand-in that is bad too is counted when it is drawn itself, so each bad sample counts once per epoch), so that
no data worker ever dies of a bad file and the training loop can count them.

Items: {"mp4": [T, 3, H, W] in [-1, 1], "txt", "num_frames" (real frames), "padded_frames" (copies of the last
frame appended), "fps", "skipped": [len(REASONS)], "image": [3, H, W] in [-1, 1]} where "image" is the
sample's own first-frame image when it has one (manifests, shards), else its first frame.
"""

from __future__ import annotations

import inspect
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import torch
from torch.utils.data import Dataset

from satvideo.config import FRAMES_4K_PLUS_1, check_value, number_rule, whole_rule
from satvideo.data.buckets import check_buckets
from satvideo.data.frames import (FRAME_SAMPLING, resampled_indices, resize_cover_center_crop, rgb_pixels,
                                  strided_indices, whole_number)
from satvideo.data.health import (SKIPPED, BadSample, FirstOfEachReason, UnusableData, classify_decode_error,
                                  tally_of)

logger = logging.getLogger(__name__)

CAPTIONS = ("first_line", "whole_file")
SHORT_CLIPS = ("pad", "skip")
MISSING_CAPTIONS = ("skip", "unconditional")
# A clip with fewer real frames than this holds no motion in latent space (one latent frame beyond the first):
# it is never padded up to a video.
MIN_REAL_FRAMES = 5
# A data worker gives up only when this many samples in a row cannot be used.
MAX_CONSECUTIVE_BAD = 64


@dataclass
class VideoInfo:
    """What a container says about its video stream, read without decoding frames."""

    num_frames: int
    fps: float
    height: int
    width: int


def open_video(data: bytes | Path, name: str) -> decord.VideoReader:
    """A reader of a video file or of its bytes; every failure is a BadSample naming why."""
    if isinstance(data, Path):
        if not data.exists():
            raise BadSample("missing_video", name)
        try:
            with open(data, "rb") as file:
                head = file.read(16)
            source = str(data)
            source.encode("utf-8")  # decord takes UTF-8 paths: a name that is not UTF-8 is read into memory
        except UnicodeEncodeError:
            source = io.BytesIO(data.read_bytes())
        except OSError as error:
            raise BadSample("unreadable_file", name, error.strerror or type(error).__name__) from None
    else:
        head, source = data[:16], io.BytesIO(data)
    if not head:
        raise BadSample("empty_file", name)
    try:
        reader = decord.VideoReader(source)
        if len(reader) == 0:
            raise RuntimeError("no frames")
    except Exception as error:  # decord raises RuntimeError or DECORDError, ffmpeg's message inside
        raise classify_decode_error(name, head, error) from None
    return reader


def video_info(reader: decord.VideoReader) -> VideoInfo:
    height, width = reader[0].shape[:2]
    return VideoInfo(len(reader), float(reader.get_avg_fps()), int(height), int(width))


def frames_to_unit_range(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8-valued [T, 3, h, w] -> [T, 3, H, W] in [-1, 1]: resized to cover `size`, centre-cropped, quantised to
    uint8 levels as torchvision does."""
    frames = resize_cover_center_crop(frames.float(), size).round().clamp(0, 255)
    return frames / 127.5 - 1.0


class ClipDataset(Dataset):
    """Video-caption samples of one source. Subclasses fill `self.names` (one per sample, used in messages; a
    PackedList, which data workers share, for sources that may be large: see data/packed.py) and
    implement `video_bytes`, `caption` and, where samples may carry one, `image_bytes`. A subclass takes
    `(data_dir, **clip_params)`; its signature lists ClipDataset's params, so that config checks name a misspelt
    one."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = [p for name, p in inspect.signature(ClipDataset.__init__).parameters.items() if name != "self"]
        data_dir = inspect.Parameter("data_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)
        cls.__signature__ = inspect.Signature([data_dir, *params])

    def __init__(self, video_size: list[int], fps: int, max_num_frames: int, skip_frms_num: int = 3,
                 frame_sampling: str = "stride", caption: str = "first_line", short_clips: str = "pad",
                 buckets: list | None = None, missing_caption: str = "skip"):
        max_num_frames = whole_number("max_num_frames", max_num_frames)
        check_value("data.params.max_num_frames", max_num_frames, FRAMES_4K_PLUS_1)
        for key, value, choices in (("frame_sampling", frame_sampling, FRAME_SAMPLING),
                                    ("caption", caption, CAPTIONS), ("short_clips", short_clips, SHORT_CLIPS),
                                    ("missing_caption", missing_caption, MISSING_CAPTIONS)):
            if value not in choices:
                raise ValueError(f"data.params.{key}={value!r}: expected one of {choices}")
        if not (isinstance(video_size, Sequence) and len(video_size) == 2):
            raise ValueError(f"data.params.video_size={video_size!r}: expected [height, width] in pixels")
        self.video_size = tuple(whole_number("video_size", side, "pixels") for side in video_size)
        if min(self.video_size) < 1:
            raise ValueError(f"data.params.video_size={video_size!r}: expected [height, width] in pixels")
        check_value("data.params.fps", fps, number_rule(0, exclusive=True))
        self.fps = fps
        self.max_num_frames = max_num_frames
        self.skip_frms_num = whole_number("skip_frms_num", skip_frms_num)
        check_value("data.params.skip_frms_num", self.skip_frms_num, whole_rule(0))
        self.frame_sampling = frame_sampling
        self.whole_caption = caption == "whole_file"
        self.short_clips = short_clips
        self.missing_caption = missing_caption  # "unconditional": train it with an empty caption, as the original
        self.buckets = check_buckets(buckets) if buckets else None  # assigned by data/buckets.py once listed
        self.names: Sequence[str] = []
        # Per sample: its (frames, height, width) and the samples that may stand in for it (buckets set these, as
        # numpy arrays, which forked data workers share; see data/packed.py).
        self.shapes: np.ndarray | None = None  # [N, 3]
        self.groups: list[np.ndarray] | None = None  # the sample indices of each bucket
        self.bucket_of: np.ndarray | None = None  # [N]: the bucket (group) of each sample
        self._position_in_group: np.ndarray | None = None  # [N]: its place among the bucket's samples
        self.reads_images = True  # a sample's own first-frame image is read (and checked); sources.clip_source
        self._report = FirstOfEachReason()
        self._warned_short_clip = False

    # --- what a source provides -------------------------------------------------------------------------

    def video_bytes(self, index: int) -> bytes | Path:
        """The sample's video: a file path or its bytes."""
        raise NotImplementedError

    def caption(self, index: int) -> str:
        """The sample's caption; BadSample when it is missing, empty or not UTF-8."""
        raise NotImplementedError

    def image_bytes(self, index: int) -> bytes | Path | None:
        """The sample's own first-frame image, when it has one."""
        return None

    def source_fps(self, index: int) -> float | None:
        """A frame rate that overrides the container's (manifests may give one)."""
        return None

    def probe(self, index: int) -> VideoInfo:
        """The sample's frame count, frame rate and size, from its container (no frame decoded)."""
        info = video_info(open_video(self.video_bytes(index), self.names[index]))
        fps = self.source_fps(index)
        return VideoInfo(info.num_frames, fps, info.height, info.width) if fps else info

    # --- items --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, index: int) -> tuple[int, int, int]:
        """(frames, height, width) of the item at `index`."""
        if self.shapes is None:
            return (self.max_num_frames, *self.video_size)
        frames, height, width = self.shapes[index].tolist()
        return frames, height, width

    def set_groups(self, shapes: list[tuple[int, int, int]], groups: list[list[int]]) -> None:
        """Per-sample shapes and the groups (buckets) within which a bad sample is replaced; every sample is in
        exactly one group."""
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(len(self), 3)
        self.groups = [np.asarray(members, dtype=np.int64) for members in groups]
        self.bucket_of = np.empty(len(self), dtype=np.int64)
        self._position_in_group = np.empty(len(self), dtype=np.int64)
        for group, members in enumerate(self.groups):
            self.bucket_of[members] = group
            self._position_in_group[members] = np.arange(len(members))

    def stand_in(self, index: int, attempt: int) -> int:
        """The sample tried at `attempt` for `index`: the next ones of its group, in order."""
        if self.groups is None:
            return (index + attempt) % len(self)
        members = self.groups[self.bucket_of[index]]
        return int(members[(self._position_in_group[index] + attempt) % len(members)])

    def group_size(self, index: int) -> int:
        return len(self) if self.groups is None else len(self.groups[self.bucket_of[index]])

    def candidates(self, index: int) -> Iterator[int]:
        """The samples tried for `index` in turn: itself, then its stand-ins, at most MAX_CONSECUTIVE_BAD."""
        for attempt in range(min(MAX_CONSECUTIVE_BAD, self.group_size(index))):
            yield self.stand_in(index, attempt)

    def __getitem__(self, index: int) -> dict:
        passed_over: list[BadSample] = []
        for candidate in self.candidates(index):
            try:
                item = self.load(candidate)
            except BadSample as error:
                self._report(error)
                passed_over.append(error)
                continue
            item[SKIPPED] = tally_of(passed_over[:1])  # the drawn sample's reason; stand-ins count when drawn
            return item
        reasons = ", ".join(sorted({error.reason for error in passed_over}))
        where = "" if self.groups is None else f" of shape {list(self.shape(index))}"
        raise UnusableData(f"{len(passed_over)} samples in a row{where} cannot be used ({reasons}), the first "
                           f"{passed_over[0].path}: check the data with scripts/check_dataset.py")

    def load(self, index: int) -> dict:
        """The item of sample `index`, or BadSample."""
        frames_wanted, height, width = self.shape(index)
        name = self.names[index]
        caption = self.caption_or_empty(index)
        reader = open_video(self.video_bytes(index), name)
        indices = self.frame_indices(len(reader), self.source_fps(index) or reader.get_avg_fps(), frames_wanted, name)
        num_real = len(indices)
        indices = self.pad_indices(indices, frames_wanted, name)
        try:
            frames = torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy())  # [T, h, w, 3] uint8
        except Exception as error:  # a container that opens but whose frames do not decode
            raise BadSample("corrupt_video", name, str(error).splitlines()[0][:200]) from None
        item = {
            "mp4": frames_to_unit_range(frames.permute(0, 3, 1, 2), (height, width)),
            "txt": caption,
            "num_frames": num_real,
            "padded_frames": frames_wanted - num_real,
            "fps": self.fps,
        }
        image = self.image_bytes(index) if self.reads_images else None
        item["image"] = self.load_image(image, name, (height, width)) if image is not None else item["mp4"][0]
        return item

    def caption_or_empty(self, index: int) -> str:
        """The caption; with `missing_caption: unconditional` an empty one where none is given."""
        try:
            return self.caption(index)
        except BadSample as error:
            if error.reason != "missing_caption" or self.missing_caption == "skip":
                raise
            return ""

    def inspect(self, index: int) -> tuple[VideoInfo, str]:
        """What scripts/check_dataset.py reports about a sample: its container's facts and its caption, after a
        full load, so that whatever training would pass over raises BadSample here too."""
        caption = self.load(index)["txt"]
        return video_info(open_video(self.video_bytes(index), self.names[index])), caption

    def frame_indices(self, num_source: int, source_fps: float, num_frames: int, name: str) -> np.ndarray:
        choose = strided_indices if self.frame_sampling == "stride" else resampled_indices
        try:
            indices = choose(num_source, source_fps, self.fps, self.skip_frms_num, num_frames)
        except ValueError as error:
            raise BadSample("too_few_frames", name, str(error)) from None
        too_short = len(indices) < (num_frames if self.short_clips == "skip" else min(MIN_REAL_FRAMES, num_frames))
        if too_short:
            raise BadSample("too_few_frames", name, f"{len(indices)} usable of {num_source} frames, {num_frames} "
                                                    f"wanted at {self.fps} fps")
        return indices

    def pad_indices(self, indices: np.ndarray, num_frames: int, name: str) -> np.ndarray:
        """Repeat the last index of a short clip; warn once per dataset copy (one per data worker)."""
        missing = num_frames - len(indices)
        if missing == 0:
            return indices
        if not self._warned_short_clip:
            logger.warning(
                "%s gives %d frames, fewer than the %d wanted; padding short clips with their last frame "
                "(warned once per data worker; the log line counts padded clips; data.params.short_clips=skip "
                "skips them instead)", name, len(indices), num_frames)
            self._warned_short_clip = True
        return np.concatenate([indices, np.full(missing, indices[-1])])

    @staticmethod
    def load_image(data: bytes | Path, name: str, size: tuple[int, int]) -> torch.Tensor:
        """A first-frame image (any format decord or PIL reads) as [3, H, W] in [-1, 1]."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as image:
                pixels = torch.from_numpy(rgb_pixels(image))  # [h, w, 3] uint8
        except (OSError, UnidentifiedImageError) as error:
            raise BadSample("bad_image", name, str(error).splitlines()[0][:200]) from None
        return frames_to_unit_range(pixels.permute(2, 0, 1)[None], size)[0]
