"""Fine-tuning dataset in the CogVideoX SFT layout.

    data_dir/videos/<name>.mp4     (subfolders allowed)
    data_dir/labels/<name>.txt     (same relative path; the caption is its first line)

Every item holds exactly `max_num_frames` frames, so items always batch with the default collate. Which
frames, by default as the original `SFTDataset` picks them (`frame_sampling: stride`):
- a clip longer than max_num_frames at `fps`: frames from `skip_frms_num` on, at the integer stride
  (end - start) // max_num_frames with end - start = max_num_frames / fps * source fps (a 30 fps clip read
  at fps 8 is thus sampled at 10 fps);
- else a clip with more than max_num_frames frames: strided over its whole length less skip_frms_num at
  both ends (it plays faster);
- else a short clip: its first 4k+1 frames after skipping, padded with its last frame.
`frame_sampling: fps` instead reads the frames nearest to the times k / fps and pads any short clip with its
last frame. Padding is never silent: items carry `padded_frames`, which the training log sums.
"""

import logging
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

# A data worker gives up only when this many videos in a row cannot be decoded.
MAX_CONSECUTIVE_FAILURES = 16
FRAME_SAMPLING = ("stride", "fps")
CAPTIONS = ("first_line", "whole_file")


def find_video_label_pairs(data_dir: Path) -> list[tuple[Path, Path]]:
    """All videos under data_dir/videos with their label files, sorted by path."""
    videos_dir, labels_dir = data_dir / "videos", data_dir / "labels"
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"video folder {videos_dir} does not exist (expected videos/*.mp4 and labels/*.txt)")
    videos = sorted(videos_dir.rglob("*.mp4"))
    if not videos:
        raise ValueError(f"no .mp4 files found under {videos_dir}")
    pairs = [(video, labels_dir / video.relative_to(videos_dir).with_suffix(".txt")) for video in videos]
    missing = [(video, label) for video, label in pairs if not label.is_file()]
    if missing:
        video, label = missing[0]
        raise FileNotFoundError(f"video {video} has no label file {label} ({len(missing)} video(s) without labels)")
    return pairs


def largest_4k_plus_1(n: int) -> int:
    """The largest count 4k+1 <= n (the causal VAE's frame counts)."""
    return n - (n - 1) % 4


def strided_indices(num_source: int, source_fps: float, fps: int, skip: int, num_frames: int) -> np.ndarray:
    """The original's frame choice (see the module docstring); at most num_frames indices, fewer when a clip
    is short. Where the original would fail (a stride of 0 for a source slower than `fps`, indices past the
    clip's end) the stride is at least 1 and indices stay inside the clip."""
    if num_source / source_fps * fps > num_frames:
        start = skip
        end = int(start + num_frames / fps * source_fps)
        indices = np.arange(start, end, max((end - start) // num_frames, 1))
    elif num_source > num_frames:
        start, end = skip, num_source - skip
        indices = np.arange(start, end, max((end - start) // num_frames, 1))
    else:
        start, end = skip, num_source - skip
        indices = np.arange(start, start + largest_4k_plus_1(end - start)) if end > start else np.arange(0)
    indices = indices[indices < num_source][:num_frames]
    if len(indices) == 0:
        raise ValueError(f"clip has {num_source} frames, too few to skip {skip} at both ends")
    return indices


def resampled_indices(num_source: int, source_fps: float, fps: int, skip: int, num_frames: int) -> np.ndarray:
    """Indices of the source frames nearest to the times k / fps, k < num_frames, after skipping
    `skip` frames at both ends. Fewer than num_frames come back when the clip is too short."""
    end = num_source - skip
    if end <= skip:
        raise ValueError(f"clip has {num_source} frames, too few to skip {skip} at both ends")
    times_in_source_frames = np.arange(num_frames) * (source_fps / fps)
    indices = skip + np.floor(times_in_source_frames + 0.5).astype(np.int64)
    return indices[indices < end]


def resize_cover_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale [T, C, h, w] keeping aspect ratio until it covers size (H, W), then cut out the centre.

    As the original (`resize_for_rectangle_crop`, centre mode): the side that fits is scaled to its target
    and the other truncated to an integer, bicubic with antialiasing.
    """
    height, width = size
    h, w = frames.shape[-2:]
    resized = (height, int(w * height / h)) if w / h > width / height else (int(h * width / w), width)
    if resized != (h, w):
        frames = F.interpolate(frames, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    return frames[..., top : top + height, left : left + width]


def whole_number(key: str, value: int | float) -> int:
    """A frame count as an int; official configs write some as floats (`skip_frms_num: 3.`)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"data.params.{key} must be a whole number of frames, got {value!r}")
    return value


class SFTDataset(Dataset):
    """Video-caption pairs; items are {"mp4": [T, 3, H, W] in [-1, 1], "txt", "num_frames" (real frames),
    "padded_frames" (copies of the last frame appended), "fps"}."""

    def __init__(self, data_dir: str, video_size: list[int], fps: int, max_num_frames: int, skip_frms_num: int = 3,
                 frame_sampling: str = "stride", caption: str = "first_line"):
        max_num_frames = whole_number("max_num_frames", max_num_frames)
        if max_num_frames % 4 != 1:
            raise ValueError(f"data.params.max_num_frames must be 4k+1 for the causal VAE, got {max_num_frames}")
        if frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"data.params.frame_sampling={frame_sampling!r}: expected one of {FRAME_SAMPLING}")
        if caption not in CAPTIONS:
            raise ValueError(f"data.params.caption={caption!r}: expected one of {CAPTIONS}")
        self.pairs = find_video_label_pairs(Path(data_dir))
        self.video_size = (int(video_size[0]), int(video_size[1]))
        self.fps = fps
        self.max_num_frames = max_num_frames
        self.skip_frms_num = whole_number("skip_frms_num", skip_frms_num)
        self.frame_sampling = frame_sampling
        self.caption = caption
        self._warned_short_clip = False

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        tries = min(MAX_CONSECUTIVE_FAILURES, len(self))
        for attempt in range(tries):
            video, label = self.pairs[(index + attempt) % len(self)]
            # decord raises RuntimeError or DECORDError; the index functions raise ValueError on too few frames, and
            # a label that is not UTF-8 UnicodeDecodeError (a ValueError): the clip is skipped, the worker lives on
            try:
                frames, num_real = self.load_frames(video)
                caption = self.read_caption(label)
            except (RuntimeError, decord.DECORDError, ValueError, OSError) as error:
                logger.warning("skipping unreadable clip %s: %s", video, error)
                continue
            return {
                "mp4": frames,
                "txt": caption,
                "num_frames": num_real,
                "padded_frames": self.max_num_frames - num_real,
                "fps": self.fps,
            }
        raise RuntimeError(f"{tries} videos in a row failed to decode, starting at {self.pairs[index][0]}")

    def read_caption(self, label: Path) -> str:
        text = label.read_text(encoding="utf-8")
        if self.caption == "whole_file":
            return text.strip()
        lines = text.splitlines()
        return lines[0] if lines else ""

    def frame_indices(self, num_source: int, source_fps: float) -> np.ndarray:
        choose = strided_indices if self.frame_sampling == "stride" else resampled_indices
        return choose(num_source, source_fps, self.fps, self.skip_frms_num, self.max_num_frames)

    def load_frames(self, video: Path) -> tuple[torch.Tensor, int]:
        """Decode the chosen frames, pad to max_num_frames, resize and crop: ([T, 3, H, W] in [-1, 1], real frames)."""
        reader = decord.VideoReader(str(video))
        indices = self.frame_indices(len(reader), reader.get_avg_fps())
        num_real = len(indices)
        indices = self.pad_to_max_num_frames(indices, video)
        frames = torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy())  # [T, h, w, 3] uint8
        frames = frames.permute(0, 3, 1, 2).float()  # [T, 3, h, w]
        frames = resize_cover_center_crop(frames, self.video_size).round().clamp(0, 255)  # uint8 levels, as torchvision
        return frames / 127.5 - 1.0, num_real

    def pad_to_max_num_frames(self, indices: np.ndarray, video: Path) -> np.ndarray:
        """Repeat the last index of a short clip; warn once per dataset copy (one per data worker)."""
        missing = self.max_num_frames - len(indices)
        if missing == 0:
            return indices
        if not self._warned_short_clip:
            logger.warning(
                "%s gives %d frames, fewer than max_num_frames=%d; padding short clips with their last frame "
                "(warned once per data worker; the log line counts padded clips)", video, len(indices),
                self.max_num_frames,
            )
            self._warned_short_clip = True
        return np.concatenate([indices, np.full(missing, indices[-1])])
