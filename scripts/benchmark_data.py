"""Data throughput: decoded clips/s from a video dataset through a DataLoader, and cached samples/s from a cache of
the same clips made by scripts/precompute.py, side by side in a small table.

    python scripts/benchmark_data.py --clips 64 --shape 17x64 --shape 33x128 --workers 0 2 --batch-size 4
    python scripts/benchmark_data.py ... --append benchmarks/RESULTS.md      # also a dated entry there

For each --shape FRAMESxSIZE, --clips toy clips (satvideo.data.toy: FRAMES frames at SIZE x SIZE, 8 fps) are
written to a temporary folder, or --data (an SFT folder) is read at that shape. The cache is made by scripts/precompute.py with the tiny VAE and a tiny random T5 whose features
have the real shape (--text-length x --text-width, 226 x 4096 as T5-XXL's): reading a cached sample costs what its
shapes cost, whatever the weights. Each row is one warm-up pass over the clips, then --passes timed passes through a
DataLoader with persistent workers, so that worker start-up is not counted.

Every flag is checked before anything is made (one line `error: ...`, exit 2, --debug for the traceback); a
failure of precompute.py is one such line too, ending with the last line precompute.py wrote to stderr. --append
adds the entry at the end of the file, which changes whole or not at all (written beside it, then renamed over it).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from benchmark import ROOT, append_entry, read_results
from satvideo.cli import run_entrypoint
from satvideo.config import FRAMES_4K_PLUS_1, ConfigError, check_value, whole_rule
from satvideo.data import CachedDataset, SFTDataset
from satvideo.data.toy import TOY_SIZE, make_toy_dataset

TINY = ["configs/tiny/model.yaml", "configs/tiny/vae.yaml", "configs/tiny/train.yaml"]


def samples_per_second(dataset: Dataset, workers: int, batch_size: int, pin_memory: bool, prefetch: int,
                       passes: int) -> float:
    """Samples per second over `passes` passes through a DataLoader, after one warm-up pass."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch if workers else None, persistent_workers=workers > 0)
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(passes):
        for _ in loader:
            pass
    return passes * len(dataset) / (time.perf_counter() - start)


def make_cache(data: Path, out: Path, params: dict, text_length: int, text_width: int) -> None:
    """A cache of `data` by scripts/precompute.py (one process) with the tiny VAE and a T5 of the given width."""
    embedder = "model.conditioner_config.params.emb_models.0.params"
    overrides = [f"args.train_data=[{data.resolve()}]", "args.device=cpu", f"{embedder}.max_length={text_length}",
                 f"{embedder}.d_model={text_width}"] + [f"data.params.{name}={value}" for name, value in params.items()]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "precompute.py"), "--out", str(out), "--base",
                             *TINY, *overrides], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        reason = lines[-1].removeprefix("error: ") if lines else "nothing on stderr"
        raise ConfigError(f"scripts/precompute.py failed (exit {result.returncode}): {reason}")


def mib_per_sample(item: dict) -> float:
    return sum(value.numel() * value.element_size() for value in item.values() if torch.is_tensor(value)) / 2**20


def clip_shape(text: str) -> tuple[int, int]:
    """`17x64` -> (frames, size)."""
    frames, _, size = text.partition("x")
    return int(frames), int(size)


def measure_shape(frames: int, size: int, folder: Path,
                  options: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """Rows (reads, one sample, workers, samples/s) for clips of one shape, from the videos and from their cache."""
    params = {"video_size": [size, size], "fps": 8, "max_num_frames": frames, "skip_frms_num": 0}
    data = options.data or folder / "clips"
    if options.data is None:
        make_toy_dataset(data, num=options.clips, size=size, frames=frames, fps=8)
    started = time.perf_counter()
    make_cache(data, folder / "cache", params, options.text_length, options.text_width)
    print(f"{frames}x{size}x{size}: precompute {time.perf_counter() - started:.1f} s, start-up included", flush=True)
    videos, cached = SFTDataset(str(data), **params), CachedDataset(str(folder / "cache"), **params)
    moments, features = cached[0]["moments"], cached[0]["text_features"]
    shapes = {"videos (decode, resize)": f"{frames}x{size}x{size} pixels, {mib_per_sample(videos[0]):.2f} MiB",
              "cache (moments, text features)": f"{list(moments.shape)} + {list(features.shape)}, "
                                                f"{mib_per_sample(cached[0]):.2f} MiB"}
    rows = []
    for workers in options.workers:
        for (reads, shape), dataset in zip(shapes.items(), (videos, cached)):
            rate = samples_per_second(dataset, workers, options.batch_size, options.pin_memory, options.prefetch,
                                      options.passes)
            rows.append((reads, shape, workers, rate))
            print(f"{shape}, {workers} workers: {rate:,.1f} samples/s", flush=True)
    return rows


def table(rows: list[tuple[str, str, int, float]], options: argparse.Namespace) -> str:
    lines = ["| reads | one sample | workers | batch | pin memory | prefetch | samples/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    pin = ("yes" if torch.cuda.is_available() else "asked, no CUDA") if options.pin_memory else "no"
    for reads, sample, workers, rate in rows:
        prefetch = options.prefetch if workers else "-"
        lines.append(f"| {reads} | {sample} | {workers} | {options.batch_size} | {pin} | {prefetch} | {rate:,.1f} |")
    return "\n".join(lines)


def check_options(options: argparse.Namespace) -> None:
    """ConfigError naming the first flag whose value cannot be benchmarked, before anything is made."""
    for flag, value in (("--clips", options.clips), ("--batch-size", options.batch_size),
                        ("--prefetch", options.prefetch), ("--passes", options.passes),
                        ("--text-length", options.text_length), ("--text-width", options.text_width)):
        check_value(flag, value, whole_rule(1))
    for workers in options.workers:
        check_value("--workers", workers, whole_rule(0))
    for frames, size in options.shape:
        for part, value, (test, expected) in (("frames", frames, FRAMES_4K_PLUS_1), ("size", size, TOY_SIZE)):
            if not test(value):
                raise ConfigError(f"--shape {frames}x{size}: {part} {value}: expected {expected}")
    if options.data is not None and not options.data.is_dir():
        raise ConfigError(f"--data {options.data}: not a folder (give an SFT folder: videos/*.mp4, labels/*.txt)")
    if options.append is not None:
        read_results(options.append)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="an SFT folder to read (default: toy clips in a temporary folder)")
    parser.add_argument("--clips", type=int, default=64, help="toy clips to make (default 64)")
    parser.add_argument("--shape", type=clip_shape, action="append",
                        help="FRAMESxSIZE of the clips, frames 4k+1 (repeatable; default 17x64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers, one row each")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pin-memory", action="store_true", help="page-locked batches (CUDA only)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches each worker prepares ahead (default 2)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the clips (default 3)")
    parser.add_argument("--text-length", type=int, default=226)
    parser.add_argument("--text-width", type=int, default=4096)
    parser.add_argument("--append", type=Path, help="also append the table as a dated entry to this file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    options = parser.parse_args()
    options.shape = options.shape or [(17, 64)]
    check_options(options)
    rows = []
    for frames, size in options.shape:
        with tempfile.TemporaryDirectory() as folder:
            rows += measure_shape(frames, size, Path(folder), options)
    text = table(rows, options)
    print(text)
    if options.append:
        append_entry(options.append, text, shlex.join(["python", "scripts/benchmark_data.py", *sys.argv[1:]]),
                     torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"appended to {options.append}")


if __name__ == "__main__":
    run_entrypoint(main)
