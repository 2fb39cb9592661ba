"""Check training data before training on it: every sample of each path (SFT folder, JSONL manifest or tar
shards) is read as training reads it, and reported with its frame count, fps, size and caption length, or with
the reason training would pass it over. Ends with the count per reason; exits 1 when any sample is bad.

    python scripts/check_dataset.py data/sft data/more.jsonl --base configs/tiny/model.yaml configs/tiny/train.yaml

With `--base`, the data params (size, fps, frames) come from the config's `data` section and caption lengths are
counted in tokens of the configured T5 tokenizer (its local files only); without it, from --size/--fps/--frames.
"""

import argparse
import sys
from collections import Counter

from satvideo.cli import is_config_file, run_entrypoint
from satvideo.conditioner import caption_tokenizer
from satvideo.config import FRAMES_4K_PLUS_1, PIXEL_SIZE, ConfigError, load_config, number_rule, to_plain, whole_rule
from satvideo.data.clips import ClipDataset
from satvideo.data.health import REASONS, BadSample
from satvideo.data.sft import SFTDataset
from satvideo.data.sources import clip_params, clip_source, model_reads_images


def check_flags(options: argparse.Namespace) -> None:
    """The data params the flags give, checked by ClipDataset's rules up front so that a message names the flag
    typed rather than the config key the dataset would name."""
    for flag, value, (test, expected) in (("--size", options.size, PIXEL_SIZE),
                                          ("--fps", options.fps, number_rule(0, exclusive=True)),
                                          ("--frames", options.frames, FRAMES_4K_PLUS_1),
                                          ("--skip", options.skip, whole_rule(0))):
        if not test(value):
            typed = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(f"{flag} {typed}: expected {expected}")


def data_params(options: argparse.Namespace) -> tuple[dict, tuple | None, bool]:
    """(dataset params, (tokenizer, max_length) or None, whether samples' own images are read) from --base or the
    command line (which checks images too)."""
    if not options.base:
        check_flags(options)
        params = {"video_size": options.size, "fps": options.fps, "max_num_frames": options.frames,
                  "skip_frms_num": options.skip}
        return params, None, True
    config = load_config([item for item in options.base if is_config_file(item)],
                         [item for item in options.base if not is_config_file(item)])
    if "data" not in config:
        raise ConfigError("the config has no `data` section (target/params of the dataset)")
    tokenizer = caption_tokenizer(to_plain(config.model.conditioner_config)) if "model" in config else None
    return clip_params(to_plain(config.data)), tokenizer, model_reads_images(config)


def caption_length(caption: str, tokenizer: tuple | None) -> str:
    if tokenizer is None:
        return f"{len(caption)} chars"
    tokens = len(tokenizer[0](caption).input_ids)
    return f"{tokens} tokens" + (f" (truncated to {tokenizer[1]})" if tokens > tokenizer[1] else "")


def check(dataset: ClipDataset, tokenizer: tuple | None, counts: Counter) -> None:
    for index, name in enumerate(dataset.names):
        try:
            info, caption = dataset.inspect(index)
        except BadSample as error:
            counts[error.reason] += 1
            print(f"BAD {error.reason:16s} {name}" + (f"  ({error.detail})" if error.detail else ""), flush=True)
            continue
        counts["ok"] += 1
        print(f"ok  {info.num_frames:4d} frames {info.fps:6.2f} fps {info.height}x{info.width}  "
              f"{caption_length(caption, tokenizer)}  {name}", flush=True)


def main() -> None:
    # --base takes every value after it, so the paths come first
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s PATH [PATH ...] [options] [--base YAML_OR_OVERRIDE ...]")
    parser.add_argument("paths", nargs="+", help="SFT folders, .jsonl manifests, tar shards")
    parser.add_argument("--base", nargs="+", help="YAML files, then key=value overrides (data and model sections)")
    parser.add_argument("--size", type=int, nargs=2, default=[480, 720], metavar=("H", "W"))
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--skip", type=int, default=3, help="frames skipped at both ends (skip_frms_num)")
    parser.add_argument("--debug", action="store_true")
    options = parser.parse_args()
    params, tokenizer, reads_images = data_params(options)
    counts: Counter = Counter()
    for path in options.paths:
        try:
            dataset = clip_source(path, SFTDataset, params, reads_images)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{path}: {error}") from error
        check(dataset, tokenizer, counts)
    bad = sum(count for reason, count in counts.items() if reason != "ok")
    summary = ", ".join(f"{reason} {counts[reason]}" for reason in REASONS if counts[reason])
    print(f"{counts['ok']} ok, {bad} bad" + (f": {summary}" if bad else ""), flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    run_entrypoint(main)
