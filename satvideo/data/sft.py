"""Fine-tuning dataset in the CogVideoX SFT layout.

    data_dir/videos/<name>.mp4     (subfolders allowed)
    data_dir/labels/<name>.txt     (same relative path, one caption per file)

Every item holds exactly `max_num_frames` frames sampled at `fps`, so items always batch with the
default collate. Clips shorter than that (after skipping and resampling) are padded by repeating
their last frame, with a warning; the original code instead truncated such clips to the largest
4k+1 count that fits, which gives clips of different lengths that cannot share a batch.
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
    """Scale [T, C, h, w] keeping aspect ratio until it covers size (H, W), then cut out the centre."""
    height, width = size
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    resized = (max(height, round(h * scale)), max(width, round(w * scale)))
    if resized != (h, w):
        frames = F.interpolate(frames, size=resized, mode="bilinear", align_corners=False, antialias=True)
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
    """Video-caption pairs; items are {"mp4": [T, 3, H, W] in [-1, 1], "txt", "num_frames", "fps"}."""

    def __init__(self, data_dir: str, video_size: list[int], fps: int, max_num_frames: int, skip_frms_num: int = 0):
        max_num_frames = whole_number("max_num_frames", max_num_frames)
        if max_num_frames % 4 != 1:
            raise ValueError(f"max_num_frames must be 4k+1 for the causal VAE, got {max_num_frames}")
        self.pairs = find_video_label_pairs(Path(data_dir))
        self.video_size = (int(video_size[0]), int(video_size[1]))
        self.fps = fps
        self.max_num_frames = max_num_frames
        self.skip_frms_num = whole_number("skip_frms_num", skip_frms_num)
        self._warned_short_clip = False

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        tries = min(MAX_CONSECUTIVE_FAILURES, len(self))
        for attempt in range(tries):
            video, label = self.pairs[(index + attempt) % len(self)]
            # decord raises RuntimeError or DECORDError; resampled_indices raises ValueError on too few frames
            try:
                frames = self.load_frames(video)
            except (RuntimeError, decord.DECORDError, ValueError) as error:
                logger.warning("skipping unreadable video %s: %s", video, error)
                continue
            return {
                "mp4": frames,
                "txt": label.read_text(encoding="utf-8").strip(),
                "num_frames": self.max_num_frames,
                "fps": self.fps,
            }
        raise RuntimeError(f"{tries} videos in a row failed to decode, starting at {self.pairs[index][0]}")

    def load_frames(self, video: Path) -> torch.Tensor:
        """Decode, resample to self.fps, pad to max_num_frames, resize and crop: [T, 3, H, W] in [-1, 1]."""
        reader = decord.VideoReader(str(video))
        indices = resampled_indices(
            len(reader), reader.get_avg_fps(), self.fps, self.skip_frms_num, self.max_num_frames
        )
        indices = self.pad_to_max_num_frames(indices, video)
        frames = torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy())  # [T, h, w, 3] uint8
        frames = frames.permute(0, 3, 1, 2).float()  # [T, 3, h, w]
        frames = resize_cover_center_crop(frames, self.video_size)
        return frames / 127.5 - 1.0

    def pad_to_max_num_frames(self, indices: np.ndarray, video: Path) -> np.ndarray:
        """Repeat the last index of a short clip; warn once per dataset copy (one per data worker)."""
        missing = self.max_num_frames - len(indices)
        if missing == 0:
            return indices
        if not self._warned_short_clip:
            logger.warning(
                "%s gives %d frames at %d fps, fewer than max_num_frames=%d; padding short clips with their "
                "last frame (warned once)", video, len(indices), self.fps, self.max_num_frames,
            )
            self._warned_short_clip = True
        return np.concatenate([indices, np.full(missing, indices[-1])])
