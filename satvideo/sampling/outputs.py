"""Where sampled videos go: never over an existing file (unless asked), each mp4 with a JSON sidecar that
describes how to make it again, one `manifest.jsonl` line per file, and optional contact sheets."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from satvideo.atomic_files import folder_locked, temporary_beside, write_text_atomically
from satvideo.config import ConfigError
from satvideo.data.video import write_mp4

MANIFEST_NAME = "manifest.jsonl"
MANIFEST_KEYS = ("file", "prompt", "seed")
SHEET_FRAMES = 8  # frames per row of a contact sheet


def save_video(frames: torch.Tensor, path: str, fps: float) -> None:
    """Write frames [T, 3, H, W] in [-1, 1] as an h264 mp4 (H and W must be even)."""
    write_mp4(to_uint8(frames), path, fps)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


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
    path = Path(output_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_short = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")  # by a kill
    with open(path, "a", encoding="utf-8") as manifest:
        manifest.write(("\n" if cut_short else "") + json.dumps(record) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def contact_sheet(rows: list[tuple[np.ndarray, str]], path: str | Path, scale: int = 1) -> None:
    """A PNG grid: per video ([T, H, W, 3] uint8) a row of up to SHEET_FRAMES evenly spaced frames (enlarged
    `scale` times), its caption written under the row."""
    height, width = (size * scale for size in rows[0][0].shape[1:3])
    caption_height = 14
    sheet = Image.new("RGB", (SHEET_FRAMES * width, len(rows) * (height + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (frames, caption) in enumerate(rows):
        picks = np.linspace(0, len(frames) - 1, min(SHEET_FRAMES, len(frames))).round().astype(int)
        top = row * (height + caption_height)
        for column, index in enumerate(picks):
            sheet.paste(Image.fromarray(frames[index]).resize((width, height), Image.NEAREST), (column * width, top))
        draw.text((2, top + height + 1), caption, fill="black")
    sheet.save(path)


class OutputWriter:
    """Writes videos (or latents) into `folder`: a name already taken gets a numbered suffix unless `overwrite`;
    every file gets a `.json` sidecar and a manifest line (replacing the old line when overwritten)."""

    def __init__(self, folder: str | Path, overwrite: bool, contact_sheets: bool):
        """Checks that `folder` can be written; it is created with the first file, so a run that fails before
        leaves nothing behind."""
        self.folder, self.overwrite, self.contact_sheets = Path(folder), overwrite, contact_sheets
        existing = self.folder
        while not existing.exists():
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise ConfigError(f"args.output_dir={folder}: not writable ({error.strerror})") from error
        manifest = self.folder / MANIFEST_NAME
        if overwrite and manifest.is_file():  # its lines are rewritten: they must read back
            try:
                manifest.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"args.overwrite: {manifest} is not UTF-8 text ({error.reason} at byte "
                                  f"{error.start}); move it away to start a new one") from None

    def place(self, written: Path, stem: str, suffix: str) -> Path:
        """Give the finished file `written` its name: `stem` (replaced when overwriting), else the first of stem,
        stem-2, ... that neither it nor its sidecar takes. The name is claimed with a hard link, which fails where
        the name exists, so another process writing into the folder at the same time never loses its file."""
        path = self.folder / f"{stem}{suffix}"
        if self.overwrite:
            os.replace(written, path)
            return path
        number = 2
        while True:
            if not path.with_suffix(".json").exists():
                try:
                    os.link(written, path)
                except FileExistsError:
                    pass
                except OSError:  # a file system without hard links: a look, then a rename (not race-free)
                    if not path.exists():
                        os.replace(written, path)
                        return path
                else:
                    written.unlink()
                    return path
            path, number = self.folder / f"{stem}-{number}{suffix}", number + 1

    def write(self, stem: str, record: dict, video: torch.Tensor | None = None, fps: float = 8,
              latents: dict[str, torch.Tensor] | None = None) -> Path:
        """Save a video [T, 3, H, W] (or a dict of latent tensors) and its sidecar; returns the file's path."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = ".mp4" if latents is None else ".safetensors"
        with temporary_beside(self.folder / f"{stem}{suffix}") as written:
            if latents is not None:
                save_file(latents, str(written), metadata={"prompt": record["prompt"], "seed": str(record["seed"])})
            else:
                frames = to_uint8(video)
                write_mp4(frames, written, fps)
            path = self.place(written, stem, suffix)
        if latents is None and self.contact_sheets:
            contact_sheet([(frames, record["prompt"])], path.with_suffix(".png"))
        write_text_atomically(path.with_suffix(".json"), json.dumps({"file": path.name, **record}, indent=2))
        self.add_to_manifest({"file": path.name, "prompt": record["prompt"], "seed": record["seed"]})
        return path

    def add_to_manifest(self, line: dict) -> None:
        """Append `line`; when overwriting, first drop the line of the file it replaces (a line that is not JSON,
        cut by an earlier kill, is kept as it is)."""
        manifest = self.folder / MANIFEST_NAME
        with folder_locked(self.folder):  # ranks and other runs writing into the folder keep each other's lines
            if self.overwrite and manifest.is_file():
                kept = [text for text in manifest.read_text(encoding="utf-8").splitlines()
                        if text.strip() and manifest_file(text) != line["file"]]
                write_text_atomically(manifest, "".join(text + "\n" for text in kept))
            write_manifest_line(str(self.folder), line)


def manifest_file(text: str) -> str | None:
    """The `file` of a manifest line; None for a line that is not a JSON object."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record.get("file") if isinstance(record, dict) else None
