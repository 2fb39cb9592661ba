"""Files that appear whole or not at all: written under a temporary name beside their place, then renamed over it
(a rename within one folder is atomic), so a reader or a killed writer never leaves half a file in place."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """The temporary path to write `path` to; when the block ends without an error it replaces `path`, and in any
    case nothing of it is left behind. It keeps the suffix (ffmpeg, safetensors choose the format by it)."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Readers see the old text or the new, never half."""
    with replaced_atomically(path) as partial:
        partial.write_text(text, encoding="utf-8")
