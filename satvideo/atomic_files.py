"""Files that appear whole or not at all: written under a temporary name beside their place, then renamed over it
(a rename within one folder is atomic), so a reader or a killed writer never leaves half a file in place."""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def temporary_beside(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, removed when the block ends unless it was moved away. It keeps the
    suffix (ffmpeg, safetensors choose the format by it) and names the process: two processes writing one path never
    write into each other's temporary file."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """The temporary path to write `path` to; when the block ends without an error it replaces `path`, and in any
    case nothing of it is left behind."""
    with temporary_beside(path) as partial:
        yield partial
        os.replace(partial, path)


@contextmanager
def folder_locked(folder: str | Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on the folder itself, no lock file) against other processes that take
    it, for a read-modify-write of a file in it."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def write_text_atomically(path: str | Path, text: str) -> None:
    """Readers see the old text or the new, never half."""
    with replaced_atomically(path) as partial:
        partial.write_text(text, encoding="utf-8")


def partial_folder(path: str | Path) -> Path:
    """Where folder_replaced_atomically builds `path` (other processes that help fill it write there too)."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.partial")


@contextmanager
def folder_replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; when the block ends without an error it takes the place of `path`
    (an earlier `path` is moved aside, then removed), and in any case no partial folder is left behind."""
    path = Path(path).absolute()
    partial, earlier = partial_folder(path), path.with_name(f".{path.name}.replaced")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if path.exists():
            shutil.rmtree(earlier, ignore_errors=True)
            os.replace(path, earlier)
        os.replace(partial, path)
        shutil.rmtree(earlier, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
