"""Shape buckets: clips of many sizes and lengths trained at a few (frames, height, width) shapes.

With `data.params.buckets: [[frames, height, width], ...]`, each clip is assigned to one bucket when the dataset is
built (from its container's frame count, frame rate and size; a manifest may give `frames`, `height`, `width` and
`fps` so that nothing is opened) and is resized to cover the bucket's size and centre-cropped, as without buckets.
The rule: the bucket whose aspect ratio is nearest the clip's; among buckets of that aspect ratio, the longest the
clip can fill at the data fps; when it fills none, the shortest (padded with its last frame as usual). The
training order (training/data_order.py) then builds every micro-batch from one bucket, and every rank draws from
the same bucket at each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from satvideo.data.frames import whole_number
from satvideo.data.health import BadSample

if TYPE_CHECKING:  # clips.py checks its buckets with this module
    from satvideo.data.clips import ClipDataset, VideoInfo

Shape = tuple[int, int, int]  # (frames, height, width)


def check_buckets(buckets: list) -> list[Shape]:
    """The configured buckets as (frames, height, width); each frame count 4k+1, sizes multiples of 8."""
    if not isinstance(buckets, Sequence) or isinstance(buckets, str):
        raise ValueError(f"data.params.buckets={buckets!r}: expected a list of [frames, height, width]")
    shapes = []
    for index, bucket in enumerate(buckets):
        if not isinstance(bucket, Sequence) or isinstance(bucket, str) or len(bucket) != 3:
            raise ValueError(f"data.params.buckets[{index}]={bucket!r}: expected [frames, height, width] "
                             "(buckets is a list of such lists)")
        frames, height, width = (whole_number(f"buckets[{index}]", value) for value in bucket)
        if min(frames, height, width) < 1:
            raise ValueError(f"data.params.buckets[{index}]={list(bucket)}: frames, height and width must be positive")
        if frames % 4 != 1 or height % 8 or width % 8:
            raise ValueError(f"data.params.buckets[{index}]={list(bucket)}: frames must be 4k+1 and height and "
                             "width multiples of 8 (the VAE's compression)")
        shapes.append((frames, height, width))
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"data.params.buckets lists a shape twice: {buckets}")
    return shapes


def fillable_frames(info: "VideoInfo", fps: int, skip: int, repeats_frames: bool) -> int:
    """How many frames at `fps` the clip holds after skipping `skip` frames at both ends; without
    `repeats_frames` (stride sampling) a clip slower than `fps` holds no more than its own frames."""
    frames = info.num_frames - 2 * skip
    at_fps = math.floor(frames * fps / info.fps)
    return max(0, at_fps if repeats_frames else min(frames, at_fps))


def choose_bucket(info: "VideoInfo", buckets: list[Shape], fps: int, skip: int, repeats_frames: bool) -> int:
    """The index of the clip's bucket (see the module docstring); `repeats_frames`: frame_sampling fps."""
    distance = [abs(math.log(info.height / info.width) - math.log(h / w)) for _, h, w in buckets]
    nearest = min(distance)
    candidates = [i for i, d in enumerate(distance) if d - nearest < 1e-9]
    available = fillable_frames(info, fps, skip, repeats_frames)
    fits = [i for i in candidates if buckets[i][0] <= available]
    if fits:
        return max(fits, key=lambda i: (buckets[i][0], buckets[i][1] * buckets[i][2]))
    return min(candidates, key=lambda i: (buckets[i][0], -buckets[i][1] * buckets[i][2]))


def members_of_buckets(bucket_of: np.ndarray, count: int) -> list[np.ndarray]:
    """The indices in each of `count` buckets, ascending, from the bucket of every index [N]."""
    return [np.flatnonzero(bucket_of == bucket) for bucket in range(count)]


def assign_buckets(dataset: "ClipDataset", buckets: list[Shape]) -> list[int]:
    """Each sample's bucket; a sample whose container cannot be read goes to the bucket with the most readable
    samples (it is passed over, and counted, when drawn, and one of them stands in). Sets the dataset's per-sample
    shapes and stand-in groups."""
    assigned, unreadable = [], []
    for index in range(len(dataset)):
        try:
            info = dataset.probe(index)
        except BadSample:
            unreadable.append(index)
            assigned.append(-1)
            continue
        assigned.append(choose_bucket(info, buckets, dataset.fps, dataset.skip_frms_num,
                                      repeats_frames=dataset.frame_sampling == "fps"))
    bucket_of = np.asarray(assigned, dtype=np.int64)
    bucket_of[unreadable] = np.bincount(bucket_of[bucket_of >= 0], minlength=len(buckets)).argmax()
    assigned = bucket_of.tolist()
    groups = members_of_buckets(bucket_of, len(buckets))
    dataset.set_groups([buckets[bucket] for bucket in assigned], groups)
    return assigned
