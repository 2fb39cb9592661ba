"""Fine-tuning dataset in the CogVideoX SFT layout.

    data_dir/videos/<name>.mp4     (subfolders allowed)
    data_dir/labels/<name>.txt     (same relative path; the caption is its first line)

Every item holds exactly `max_num_frames` frames (frames.py says which), so items always batch with the default
collate. Padding is never silent: items carry `padded_frames`, which the training log sums. A video without a
label, or with an empty or non-UTF-8 one, is passed over and counted like an unreadable video (see clips.py).
"""

from pathlib import Path

from satvideo.data.clips import ClipDataset
from satvideo.data.health import read_caption_file
from satvideo.data.packed import PackedList


def find_videos(data_dir: Path) -> list[Path]:
    """All videos under data_dir/videos, sorted by path."""
    videos_dir = data_dir / "videos"
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"video folder {videos_dir} does not exist (expected videos/*.mp4 and labels/*.txt)")
    videos = sorted(videos_dir.rglob("*.mp4"))
    if not videos:
        raise ValueError(f"no .mp4 files found under {videos_dir}")
    return videos


class SFTDataset(ClipDataset):
    """Video-caption pairs of an SFT folder (items as ClipDataset describes)."""

    def __init__(self, data_dir: str, **clip_params):
        super().__init__(**clip_params)
        self.folder = Path(data_dir)
        self.names = PackedList(str(video) for video in find_videos(self.folder))

    def video_bytes(self, index: int) -> Path:
        return Path(self.names[index])

    def label(self, index: int) -> Path:
        """labels/<name>.txt beside videos/<name>.mp4."""
        video = self.video_bytes(index).relative_to(self.folder / "videos")
        return self.folder / "labels" / video.with_suffix(".txt")

    def caption(self, index: int) -> str:
        return read_caption_file(self.label(index), self.whole_caption)
