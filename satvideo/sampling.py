"""Prompt sources and output files for the sampling entrypoint."""

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from satvideo.data.video import write_mp4

MANIFEST_NAME = "manifest.jsonl"
MANIFEST_KEYS = ("file", "prompt", "seed")


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def interactive_prompts(stream: TextIO | None = None) -> Iterator[str]:
    """Prompts typed one per line (on stdin by default), until end of input or an empty line."""
    stream = stream or sys.stdin
    while True:
        print("prompt> ", end="", file=sys.stderr, flush=True)
        prompt = stream.readline().strip()
        if not prompt:
            return
        yield prompt


def save_video(frames: torch.Tensor, path: str, fps: int) -> None:
    """Write frames [T, 3, H, W] in [-1, 1] as an h264 mp4 (H and W must be even)."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    write_mp4(pixels.permute(0, 2, 3, 1).cpu().numpy(), path, fps)  # [T, H, W, 3]


def slugify(prompt: str, max_length: int = 60) -> str:
    """A file-name-safe form of the prompt: lower-case words joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "video"


def write_manifest_line(output_dir: str, record: dict) -> None:
    """Append one JSON record to output_dir/manifest.jsonl: file (relative to output_dir), prompt,
    seed, and any further keys."""
    missing = [key for key in MANIFEST_KEYS if key not in record]
    if missing:
        raise ValueError(f"manifest record lacks {missing}: {record}")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / MANIFEST_NAME, "a", encoding="utf-8") as manifest:
        manifest.write(json.dumps(record) + "\n")
