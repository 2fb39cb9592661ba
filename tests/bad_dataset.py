"""A toy SFT folder with one sample of every kind training must pass over (see satvideo/data/health.py)."""

import subprocess
from pathlib import Path

import imageio_ffmpeg

from satvideo.data.toy import make_toy_dataset
from satvideo.data.video import read_mp4, write_mp4

# file stem -> the reason it is passed over
BAD_SAMPLES = {
    "bad_zero_bytes": "empty_file",
    "bad_truncated": "corrupt_video",
    "bad_text": "not_a_video",
    "bad_three_frames": "too_few_frames",
    "bad_audio_only": "no_video_stream",
    "bad_no_label": "missing_caption",
    "bad_empty_label": "empty_caption",
    "bad_latin1_label": "caption_not_utf8",
}


def make_bad_dataset(folder: str | Path, good: int = 8, size: int = 32, frames: int = 9) -> Path:
    """`good` toy clips plus one clip of each BAD_SAMPLES kind, in the SFT layout."""
    folder = Path(folder)
    make_toy_dataset(folder, num=good, size=size, frames=frames, fps=8, seed=0)
    videos, labels = folder / "videos", folder / "labels"
    good_video = videos / "00000.mp4"
    clip, _ = read_mp4(good_video)
    for stem in BAD_SAMPLES:
        (labels / f"{stem}.txt").write_text(f"caption of {stem}\n", encoding="utf-8")
    (videos / "bad_zero_bytes.mp4").write_bytes(b"")
    data = good_video.read_bytes()
    (videos / "bad_truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "bad_text.mp4").write_text("these are notes, not a video\n")
    write_mp4(clip[:3], videos / "bad_three_frames.mp4", fps=8)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", str(videos / "bad_audio_only.mp4")], check=True)
    for stem in ("bad_no_label", "bad_empty_label", "bad_latin1_label"):
        (videos / f"{stem}.mp4").write_bytes(data)
    (labels / "bad_no_label.txt").unlink()
    (labels / "bad_empty_label.txt").write_text("\n")
    (labels / "bad_latin1_label.txt").write_bytes("une vid\xe9o".encode("latin-1"))
    return folder
