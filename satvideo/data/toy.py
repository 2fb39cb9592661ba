"""A synthetic captioned dataset (a coloured shape moving over a dark background) and the measures that check
whether a generated video shows what its prompt asked for: the shape's colour, one shape per frame, and the
direction it moves in."""

import re
from pathlib import Path

import numpy as np

from satvideo.config import Rule, check_value, is_whole_number, number_rule, whole_rule
from satvideo.data.video import write_mp4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle")
# Unit motion per direction as (dy, dx) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = (16, 16, 24)
# The shape's radius is size / 8 and its centre may fall anywhere between pixel centres: a circle is drawn in every
# frame only when its radius reaches half a pixel diagonal (sqrt(2) / 2), so from 4 * sqrt(2) = 5.66 pixels up.
MIN_SIZE = 6
# h264 in yuv420p (write_mp4) halves the chroma planes, so both sides must be even.
TOY_SIZE: Rule = (lambda value: is_whole_number(value) and value >= MIN_SIZE and value % 2 == 0,
                  f"an even whole number >= {MIN_SIZE} (smaller shapes can miss every pixel; h264 needs even sides)")


def toy_caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def shape_mask(shape: str, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean [size, size] mask of a square (half side = radius) or circle centred at (y, x)."""
    ys, xs = np.mgrid[:size, :size] + 0.5  # pixel centres
    dy, dx = ys - centre[0], xs - centre[1]
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= radius
    return dy**2 + dx**2 <= radius**2


def render_toy_video(
    colour: str, shape: str, direction: str, size: int, frames: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 frames [T, size, size, 3]: the shape crosses the frame along `direction`, at a random
    position across it."""
    radius = size / 8
    dy, dx = DIRECTIONS[direction]
    travel = np.linspace(radius, size - radius, frames)  # edge to edge along the motion axis
    across = rng.uniform(radius, size - radius)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    for t in range(frames):
        along = travel[t] if dy + dx > 0 else travel[-1 - t]
        centre = (along, across) if dy else (across, along)
        video[t][shape_mask(shape, size, centre, radius)] = PALETTE[colour]
    return video


def check_toy_params(size: int, frames: int, fps: float,
                     names: tuple[str, str, str] = ("size", "frames", "fps")) -> None:
    """ConfigError unless the videos can be drawn and encoded. `names` are the options the values came from, for
    the message."""
    rules = (TOY_SIZE, whole_rule(1), number_rule(0, exclusive=True))
    for name, value, rule in zip(names, (size, frames, fps), rules):
        check_value(name, value, rule)


TOY_ENTRIES = ("videos", "labels")  # all that make_toy_dataset writes in its folder


def make_toy_dataset(
    out: str | Path, num: int = 64, size: int = 64, frames: int = 17, fps: int = 8, seed: int = 0
) -> list[tuple[Path, str]]:
    """Write `num` toy videos in the SFT layout (out/videos/*.mp4, out/labels/*.txt); colours cycle
    through the palette so every colour is equally represented. Returns (video path, caption) pairs."""
    check_toy_params(size, frames, fps)
    rng = np.random.default_rng(seed)
    colours = list(PALETTE)
    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(num):
        colour = colours[i % len(colours)]
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        video_path = out / "videos" / f"{i:05d}.mp4"
        write_mp4(render_toy_video(colour, shape, direction, size, frames, rng), video_path, fps)
        caption = toy_caption(colour, shape, direction)
        (out / "labels" / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append((video_path, caption))
    return written


def caption_parts(prompt: str) -> dict[str, str | None]:
    """The colour and direction a toy prompt names (None for what it does not name)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return {"colour": next((w for w in words if w in PALETTE), None),
            "direction": next((w for w in words if w in DIRECTIONS), None)}


def palette_colour_in(prompt: str) -> str | None:
    """The first palette colour named in the prompt, as a whole word."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in PALETTE:
            return word
    return None


def dominant_palette_colour(frames: np.ndarray, min_value: int = 80, min_saturation: float = 0.4) -> str | None:
    """Majority palette colour of the bright, saturated pixels of uint8 frames [..., 3]; None when
    no pixel is bright and saturated (the dark background never is)."""
    pixels = frames.reshape(-1, 3).astype(np.float32)
    value = pixels.max(axis=1)
    saturation = (value - pixels.min(axis=1)) / np.maximum(value, 1.0)
    pixels = pixels[(value >= min_value) & (saturation >= min_saturation)]
    if len(pixels) == 0:
        return None
    # Compare colours with brightness divided out, so a dim red still counts as red.
    names = list(PALETTE)
    palette = np.array([PALETTE[name] for name in names], dtype=np.float32)
    palette /= palette.max(axis=1, keepdims=True)
    pixels /= pixels.max(axis=1, keepdims=True)
    distances = np.stack([((pixels - colour) ** 2).sum(axis=1) for colour in palette], axis=1)  # [N, colours]
    votes = np.bincount(distances.argmin(axis=1), minlength=len(names))
    return names[votes.argmax()]


def bright_mask(frames: np.ndarray, min_value: int = 80, min_saturation: float = 0.4) -> np.ndarray:
    """Bool [..., H, W]: the bright, saturated pixels of uint8 frames [..., H, W, 3] (the shape, not the background)."""
    pixels = frames.astype(np.float32)
    value = pixels.max(axis=-1)
    saturation = (value - pixels.min(axis=-1)) / np.maximum(value, 1.0)
    return (value >= min_value) & (saturation >= min_saturation)


def region_sizes(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 4-connected regions of a bool [H, W] mask."""
    seen, sizes = np.zeros_like(mask), []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(size)
    return sizes


def shapes_per_frame(frames: np.ndarray, min_area_fraction: float = 0.005) -> list[int]:
    """Connected bright regions in each frame of [T, H, W, 3], ignoring specks below a fraction of the frame."""
    masks = bright_mask(frames)
    min_area = max(2, int(min_area_fraction * masks[0].size))
    return [sum(size >= min_area for size in region_sizes(mask)) for mask in masks]


def motion_direction(frames: np.ndarray, min_travel: float = 0.15) -> str | None:
    """The direction of the bright shape's centroid track over [T, H, W, 3]: a line fitted to the centroids over
    time, its dominant axis and sign; None when it travels less than `min_travel` of the frame."""
    masks = bright_mask(frames)
    times, centroids = [], []
    for t, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(ys):
            times.append(t)
            centroids.append((ys.mean(), xs.mean()))
    if len(times) < max(2, len(frames) // 2):
        return None
    track = np.array(centroids)
    slope_y, slope_x = (np.polyfit(times, track[:, axis], 1)[0] for axis in (0, 1))
    height, width = masks.shape[1:]
    travel_y, travel_x = slope_y * (len(frames) - 1) / height, slope_x * (len(frames) - 1) / width
    if max(abs(travel_y), abs(travel_x)) < min_travel:
        return None
    step = (int(np.sign(travel_y)), 0) if abs(travel_y) > abs(travel_x) else (0, int(np.sign(travel_x)))
    return next(name for name, unit in DIRECTIONS.items() if unit == step)


def check_toy_video(frames: np.ndarray, prompt: str) -> dict:
    """Measures of one video against its prompt: colour, shapes per frame, direction, and whether each is right
    (one shape per frame allowing one frame to miss)."""
    expected = caption_parts(prompt)
    colour, shapes, direction = dominant_palette_colour(frames), shapes_per_frame(frames), motion_direction(frames)
    return {"colour": colour, "colour_ok": colour == expected["colour"],
            "shapes": shapes, "one_shape_ok": sum(count != 1 for count in shapes) <= 1,
            "direction": direction, "direction_ok": direction == expected["direction"]}
