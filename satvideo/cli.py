"""Command line shared by the entrypoints: `--base a.yaml b.yaml ... key=value ...`."""

from __future__ import annotations

import argparse

from omegaconf import DictConfig

from satvideo.config import load_config


def parse_config(description: str, argv: list[str] | None = None) -> DictConfig:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", nargs="+", required=True, metavar="YAML_OR_OVERRIDE",
                        help="YAML files, merged in order, then key=value overrides (e.g. args.train_iters=20)")
    parsed = parser.parse_args(argv)
    # argparse cannot end a nargs="+" list before positionals, so files and overrides share one list.
    files = [item for item in parsed.base if is_config_file(item)]
    overrides = [item for item in parsed.base if not is_config_file(item)]
    return load_config(files, overrides)


def is_config_file(item: str) -> bool:
    return item.endswith((".yaml", ".yml")) or "=" not in item
