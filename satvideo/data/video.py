"""Reading and writing mp4 files as uint8 frame arrays of shape [T, H, W, 3]."""

from pathlib import Path

import decord
import imageio_ffmpeg
import numpy as np

from satvideo.atomic_files import replaced_atomically

# Constant-rate-factor of libx264 (0 lossless .. 51 worst); 12 keeps flat colours within a few levels.
H264_CRF = 12


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] as h264/yuv420p, the format every player accepts. The file appears
    whole or not at all: ffmpeg writes a temporary file beside it, renamed once it is complete."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even height and width, got {height}x{width} for {path}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps} for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as partial:
        writer = imageio_ffmpeg.write_frames(
            str(partial),
            size=(width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            output_params=["-crf", str(H264_CRF)],
            macro_block_size=1,  # sizes are checked above; never let ffmpeg rescale
            ffmpeg_log_level="error",
        )
        try:
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:  # on an interrupt too: ffmpeg stops before its file is removed, and does not write it again
            writer.close()
        if not partial.is_file() or partial.stat().st_size == 0:
            raise OSError(f"ffmpeg wrote nothing for {path}")


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video: (uint8 frames [T, H, W, 3], average fps)."""
    reader = decord.VideoReader(str(path))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    return frames, reader.get_avg_fps()
