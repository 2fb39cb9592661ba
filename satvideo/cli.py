"""Command line shared by the entrypoints: `--base a.yaml b.yaml ... key=value ... [--debug]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from satvideo.config import SECTIONS, ConfigError, SatvideoError, load_config


def parse_config(description: str, argv: list[str] | None = None) -> DictConfig:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", nargs="+", required=True, metavar="YAML_OR_OVERRIDE",
                        help="YAML files, merged in order, then key=value overrides (e.g. args.train_iters=20)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of configuration errors")
    parsed = parser.parse_args(argv)
    # argparse cannot end a nargs="+" list before positionals, so files and overrides share one list.
    files = [item for item in parsed.base if is_config_file(item)]
    overrides = [item for item in parsed.base if not is_config_file(item)]
    return load_config(files, overrides)


def is_config_file(item: str) -> bool:
    """A YAML path, not a `section.key=value` override (whose value may end in .yaml too) nor a `section.key` that
    lacks its value (load_config says so); `model.yaml` stays a file."""
    key, has_value, _ = item.partition("=")
    names_a_key = key.split(".", 1)[0] in SECTIONS and "." in key
    if has_value and names_a_key:
        return False
    return item.endswith((".yaml", ".yml")) or not (has_value or names_a_key)


def nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else the closest of its parents that does (a relative path ends at `.`)."""
    return next(candidate for candidate in (path, *path.parents) if candidate.exists())


def other_entries(folder: Path, patterns: tuple[str, ...]) -> str:
    """The names in `folder` that match none of `patterns`, sorted, the first three listed ("a, b, c ..."); empty
    when there are none."""
    others = sorted(path.name for path in folder.iterdir() if not any(path.match(pattern) for pattern in patterns))
    return ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")


def check_output_folder(folder: str, flag: str, overwrite: bool, replaced_whole: bool = True) -> None:
    """ConfigError unless `folder` can be written as an output: not a file nor below one, and absent or empty
    unless `overwrite` (the --overwrite flag) lets it be replaced. `replaced_whole`: the folder is filled beside
    itself and renamed into place, so its parent must take new entries; else files are written in it."""
    path = Path(folder)
    existing = nearest_existing(path)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies below the file {existing}"
        raise ConfigError(f"{flag} {folder} {where}; give a folder")
    writable = nearest_existing(path.absolute().parent if replaced_whole else path)
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {folder}: cannot create files in {writable}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {folder} exists and is not empty; choose another folder or pass --overwrite")


def check_output_file(path: str | Path, flag: str, overwrite: bool, make_folders: bool = False) -> None:
    """ConfigError unless `path` can be written as an output file: not a folder, in a folder that exists (or, with
    `make_folders`, that can be made) and takes new files, and absent unless `overwrite` lets it be replaced."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path")
    ancestor = nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path} lies below the file {ancestor}; give a file path")
    if ancestor != target.parent and not make_folders:
        raise ConfigError(f"{flag} {path}: there is no folder {target.parent} to write it in")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot create files in {ancestor}")
    if target.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} exists; choose another path or pass --overwrite")


def run_entrypoint(main: Callable[[], None]) -> None:
    """Run `main` with logging set up; satvideo's own errors end the process with one line and exit code 2 (the
    traceback with --debug)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        main()
    except SatvideoError as error:
        if "--debug" in sys.argv:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
