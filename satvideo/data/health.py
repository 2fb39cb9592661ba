"""Why a training sample cannot be used, and the tally of such samples.

A dataset raises `BadSample(reason, path, detail)` for a clip it cannot use; the reasons are a fixed list, so a
tally is a vector that batches carry from data workers to the training loop (`SKIPPED`, one count per reason),
which sums it over ranks, reports it in the log line and `metrics.jsonl`, and stops the run above
`data.max_bad_share`. `scripts/check_dataset.py` reports the same reasons per file before any training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from satvideo.config import SatvideoError

logger = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    "missing_video": "the video file does not exist",
    "empty_file": "the video file has zero bytes",
    "not_a_video": "the file is not in a video container format",
    "corrupt_video": "a video container that cannot be decoded (truncated or damaged)",
    "no_video_stream": "the file has no video stream (audio only?)",
    "too_few_frames": "the clip is too short for the requested frames",
    "missing_caption": "no caption (label file or field missing)",
    "empty_caption": "the caption is empty",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "bad_image": "the conditioning image is missing or cannot be decoded",
    "unreadable_file": "a file that exists but cannot be read (a folder, or no permission)",
}
SKIPPED = "skipped"  # batch key: LongTensor [B, len(REASONS)], bad samples passed over before each item

# Container signatures: (byte offset, magic). ISO media (mp4/mov) boxes carry their type at offset 4.
CONTAINER_MAGIC = ((4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (0, b"\x1a\x45\xdf\xa3"),
                   (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"))


class UnusableData(SatvideoError):
    """So many samples in a row cannot be used that the data, not a file, is at fault: the run stops.

    Raised in a data worker, it reaches the main process through the DataLoader, which rebuilds it with the
    worker's traceback as its message; `str` keeps only the original line."""

    def __str__(self) -> str:
        text = super().__str__().strip()
        last = text.splitlines()[-1] if text else text
        return last.removeprefix(f"{type(self).__module__}.{type(self).__qualname__}: ")


class BadSample(Exception):
    """A sample that cannot be trained on; `reason` is a key of REASONS."""

    def __init__(self, reason: str, path: str | Path, detail: str = ""):
        assert reason in REASONS, reason
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{path}: {REASONS[reason]}" + (f" ({detail})" if detail else ""))


def looks_like_video_container(head: bytes) -> bool:
    """Whether the first bytes of a file carry a known video container signature."""
    return any(head[offset:offset + len(magic)] == magic for offset, magic in CONTAINER_MAGIC)


def classify_decode_error(path: str | Path, head: bytes, error: Exception) -> BadSample:
    """A decoder's failure on a file as a BadSample: empty, not a container, no video stream, or corrupt."""
    message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    message = "" if str(path) in message else message  # decord's "Error reading <path>..." says nothing more
    if not head:
        return BadSample("empty_file", path)
    if "cannot find video stream" in str(error):
        return BadSample("no_video_stream", path)
    if not looks_like_video_container(head):
        return BadSample("not_a_video", path, message)
    return BadSample("corrupt_video", path, message)


def decode_caption(data: bytes, path: str | Path, whole_file: bool) -> str:
    """The caption in a label's bytes: its first line (or all of it, stripped) as UTF-8, never empty."""
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the caption
    except UnicodeDecodeError as error:
        raise BadSample("caption_not_utf8", path, f"byte {error.start}") from None
    caption = text.strip() if whole_file else (text.splitlines() or [""])[0].strip()
    if not caption:
        raise BadSample("empty_caption", path)
    return caption


def read_caption_file(path: Path, whole_file: bool) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_caption", path) from None
    except OSError as error:
        raise BadSample("unreadable_file", path, error.strerror or type(error).__name__) from None
    return decode_caption(data, path, whole_file)


def empty_tally() -> torch.Tensor:
    return torch.zeros(len(REASONS), dtype=torch.long)


def tally_of(errors: list[BadSample]) -> torch.Tensor:
    """Counts per reason of the bad samples passed over, as a vector in REASONS order."""
    counts = empty_tally()
    for error in errors:
        counts[list(REASONS).index(error.reason)] += 1
    return counts


def tally_dict(counts: torch.Tensor | list[int]) -> dict[str, int]:
    """The non-zero counts of a tally, by reason."""
    return {reason: int(count) for reason, count in zip(REASONS, counts) if int(count)}


class FirstOfEachReason:
    """Logs the first bad sample of each reason (per process: the main one and each data worker)."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, error: BadSample) -> None:
        if error.reason not in self.seen:
            self.seen.add(error.reason)
            logger.warning("skipping %s (first %s; later ones are only counted)", error, error.reason)
