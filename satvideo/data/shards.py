"""Clips stored as tar shards in the WebDataset layout: the members of one sample share a key (the path up to
the first dot of the file name) and differ in extension.

    shard-000.tar:  0001.mp4  0001.txt  0001.jpg  0002.mp4  0002.json ...

A sample's video is its .mp4 (or .avi/.webm/.mkv/.mov) member; its caption the .txt member, else the `caption`
field of its .json member (which may also give `fps`); an optional .jpg/.png/.webp member is the first frame for
image-to-video training. `data_dir` is one .tar file, a folder of them, or a brace pattern
(`shards/train-{000..127}.tar`).

Shards are indexed when the dataset is built (one pass over the tar headers, no member data read) and members are
read by offset, so tar sources draw samples in the same seeded order as folders and manifests: weights, buckets,
data workers and bit-exact resume work alike for every source.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from satvideo.data.clips import ClipDataset
from satvideo.data.health import BadSample, decode_caption
from satvideo.data.packed import PackedList

VIDEO_EXTENSIONS = ("mp4", "avi", "webm", "mkv", "mov")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardSample:
    shard: Path
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # extension -> (data offset, size)


def shard_paths(data_dir: str) -> list[Path]:
    """The tar files a `data_dir` names, in order."""
    path = Path(data_dir)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ValueError(f"no .tar shards in {path}")
        return shards
    shards = [Path(item) for item in braceexpand.braceexpand(data_dir)]
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"tar shard {missing[0]} does not exist ({len(missing)} of {len(shards)} missing)")
    return shards


def split_key(member_name: str) -> tuple[str, str]:
    """`dir/0001.first.mp4` -> (`dir/0001`, `first.mp4`), as WebDataset groups members."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def index_shard(shard: Path) -> list[ShardSample]:
    """The samples of one tar file in member order."""
    samples: dict[str, ShardSample] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_key(member.name)
                samples.setdefault(key, ShardSample(shard, key)).members[extension] = (member.offset_data,
                                                                                       member.size)
    except tarfile.TarError as error:
        raise ValueError(f"tar shard {shard} cannot be read: {error}") from None
    return list(samples.values())


def read_member(sample: ShardSample, extension: str) -> bytes:
    offset, size = sample.members[extension]
    with open(sample.shard, "rb") as file:
        file.seek(offset)
        return file.read(size)


class TarShardDataset(ClipDataset):
    """The samples of WebDataset tar shards (items as ClipDataset describes)."""

    def __init__(self, data_dir: str, **clip_params):
        super().__init__(**clip_params)
        self.shards = shard_paths(data_dir)
        samples = [(number, sample) for number, shard in enumerate(self.shards) for sample in index_shard(shard)]
        if not samples:
            raise ValueError(f"no samples in the tar shards {data_dir}")
        self.names = PackedList(f"{sample.shard}:{sample.key}" for _, sample in samples)
        self.samples = PackedList((number, sample.key, sample.members) for number, sample in samples)

    def sample(self, index: int) -> ShardSample:
        number, key, members = self.samples[index]
        return ShardSample(self.shards[number], key, {extension: tuple(place) for extension, place in members.items()})

    def video_bytes(self, index: int) -> bytes:
        sample = self.sample(index)
        extension = next((ext for ext in VIDEO_EXTENSIONS if ext in sample.members), None)
        if extension is None:
            raise BadSample("missing_video", self.names[index], f"members: {', '.join(sorted(sample.members))}")
        return read_member(sample, extension)

    def metadata(self, index: int) -> dict:
        sample = self.sample(index)
        if "json" not in sample.members:
            return {}
        try:
            metadata = json.loads(read_member(sample, "json"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return metadata if isinstance(metadata, dict) else {}

    def caption(self, index: int) -> str:
        sample = self.sample(index)
        if "txt" in sample.members:
            return decode_caption(read_member(sample, "txt"), self.names[index], self.whole_caption)
        caption = self.metadata(index).get("caption")
        if not isinstance(caption, str):
            raise BadSample("missing_caption", self.names[index])
        return decode_caption(caption.encode("utf-8"), self.names[index], whole_file=True)

    def image_bytes(self, index: int) -> bytes | None:
        sample = self.sample(index)
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.members), None)
        return read_member(sample, extension) if extension else None

    def source_fps(self, index: int) -> float | None:
        fps = self.metadata(index).get("fps")
        return float(fps) if isinstance(fps, (int, float)) and fps > 0 else None
