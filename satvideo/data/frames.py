"""Which frames of a clip to train on, and how a frame is brought to the training size.

By default as the original `SFTDataset` picks them (`frame_sampling: stride`):
- a clip longer than max_num_frames at `fps`: frames from `skip_frms_num` on, at the integer stride
  (end - start) // max_num_frames with end - start = max_num_frames / fps * source fps (a 30 fps clip read
  at fps 8 is thus sampled at 10 fps);
- else a clip with more than max_num_frames frames: strided over its whole length less skip_frms_num at
  both ends (it plays faster);
- else a short clip: its first 4k+1 frames after skipping, padded with its last frame.
`frame_sampling: fps` instead reads the frames nearest to the times k / fps and pads any short clip with its
last frame.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from satvideo.config import is_whole_number

FRAME_SAMPLING = ("stride", "fps")


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """An image of any mode (grey, palette, RGBA, CMYK, 16-bit grey) -> [h, w, 3] uint8 RGB. 16-bit grey goes to 8
    bits first: PIL's RGB conversion would clip it."""
    if image.mode.startswith("I"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
    return np.asarray(image.convert("RGB")).copy()


def largest_4k_plus_1(n: int) -> int:
    """The largest count 4k+1 <= n (the causal VAE's frame counts)."""
    return n - (n - 1) % 4


def strided_indices(num_source: int, source_fps: float, fps: int, skip: int, num_frames: int) -> np.ndarray:
    """The original's frame choice (see the module docstring); at most num_frames indices, fewer when a clip
    is short. Where the original would fail (a stride of 0 for a source slower than `fps`, indices past the
    clip's end) consecutive frames are taken and indices stay inside the clip."""
    if num_source / source_fps * fps > num_frames:
        start = skip
        end = max(int(start + num_frames / fps * source_fps), start + num_frames)  # slower source: consecutive
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


def whole_number(key: str, value: int | float, unit: str = "frames") -> int:
    """A count of frames (or pixels) as an int; official configs write some as floats (`skip_frms_num: 3.`)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not is_whole_number(value):
        raise ValueError(f"data.params.{key} must be a whole number of {unit}, got {value!r}")
    return value
