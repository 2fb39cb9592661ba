"""A JSONL manifest of clips, one JSON object per line:

    {"video": "clips/a.mp4", "caption": "a red square moving left", "image": "frames/a.png", "fps": 30}

`video` is required; relative paths are relative to the manifest's folder. `image` (a first frame for
image-to-video training) and `fps` (overriding the container's frame rate) are optional, and so are `frames`,
`height` and `width`: with all four given, bucket assignment opens no video. Other keys are ignored (and not
kept in memory).
A sample whose caption is missing or empty is passed over and counted (see clips.py).
"""

import json
import os
from pathlib import Path

from satvideo.config import TEXT, Rule, nullable, number_rule, whole_rule
from satvideo.data.clips import ClipDataset, VideoInfo
from satvideo.data.health import BadSample
from satvideo.data.packed import PackedList

# What the dataset reads of an entry after building `names` (which holds each video path).
ENTRY_KEYS = ("caption", "image", "fps", "frames", "height", "width")


def read_manifest(path: Path) -> list[dict]:
    """The manifest's entries; a line that is not a JSON object with a `video` is an error naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        # split at newlines only: splitlines would also cut a caption at U+2028 or \x85, which JSON may hold raw
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # a byte-order mark is no part of line 1
    except OSError as error:  # a file without read access; UnicodeDecodeError, a ValueError, names itself
        raise ValueError(f"manifest {path} cannot be read ({error.strerror or error})") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
            raise ValueError(f"{path}:{number}: expected an object with a \"video\" path")
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        entries.append(entry)
    if not entries:
        raise ValueError(f"manifest {path} lists no clips")
    return entries


# What an entry's optional fields must be (a data worker would otherwise meet a bad one mid-run).
ENTRY_RULES: dict[str, Rule] = {"image": nullable(TEXT), "fps": nullable(number_rule(0, exclusive=True)),
                                **{key: nullable(whole_rule(1)) for key in ("frames", "height", "width")}}


def entry_problem(entry: dict) -> str | None:
    for key, (test, expected) in ENTRY_RULES.items():
        if not test(entry.get(key)):
            return f"\"{key}\": {json.dumps(entry[key])}: expected {expected}"
    return None


class ManifestDataset(ClipDataset):
    """The clips of a JSONL manifest (items as ClipDataset describes, with "image" where the entry gives one)."""

    def __init__(self, data_dir: str, **clip_params):
        super().__init__(**clip_params)
        manifest = Path(data_dir)
        entries = read_manifest(manifest)
        self.root = manifest.parent
        root = str(self.root)  # os.path.join: pathlib's `/` would take 4 s per million entries
        self.names = PackedList(os.path.join(root, entry["video"]) for entry in entries)
        self.entries = PackedList({key: entry[key] for key in ENTRY_KEYS if key in entry} for entry in entries)

    def video_bytes(self, index: int) -> Path:
        return Path(self.names[index])

    def caption(self, index: int) -> str:
        caption = self.entries[index].get("caption")
        if not isinstance(caption, str):
            raise BadSample("missing_caption", self.names[index])
        if not caption.strip():
            raise BadSample("empty_caption", self.names[index])
        return caption.strip()

    def image_bytes(self, index: int) -> Path | None:
        image = self.entries[index].get("image")
        return self.root / image if image else None

    def source_fps(self, index: int) -> float | None:
        fps = self.entries[index].get("fps")
        return float(fps) if fps is not None else None

    def probe(self, index: int) -> VideoInfo:
        entry = self.entries[index]
        if all(isinstance(entry.get(key), (int, float)) for key in ("frames", "height", "width", "fps")):
            return VideoInfo(int(entry["frames"]), float(entry["fps"]), int(entry["height"]), int(entry["width"]))
        return super().probe(index)
