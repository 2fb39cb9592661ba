"""Measure sampled toy videos against their prompts (models trained on the toy dataset): per video the colour of
the shape, the number of shapes per frame and the direction of motion, as a table with totals. Reads
OUTPUT_DIR/manifest.jsonl as written by sample_video.py (a line cut short by a kill is passed over, with a note);
`--contact-sheet PNG` also lays the videos out frame by frame with their prompts, in a file that appears whole or
not at all (an existing one is refused unless --overwrite).

Every listed mp4 is read before anything is measured. One that is missing or cannot be decoded is an error (one
line naming it, exit 2), not a failed video: sampling writes each mp4 whole before its manifest line, so such a file
was lost or damaged afterwards and says nothing of the model. Exit 1 means the videos were measured and one of the
three measures is right for fewer than --min-fraction of them.
"""

import argparse
import json
import sys
from pathlib import Path

import decord
import numpy as np

from satvideo.atomic_files import replaced_atomically
from satvideo.cli import check_output_file, run_entrypoint
from satvideo.config import ConfigError, check_value, number_rule
from satvideo.data.toy import check_toy_video
from satvideo.data.video import read_mp4
from satvideo.sampling.outputs import MANIFEST_NAME, contact_sheet, manifest_file

SHEET_SUFFIX = ".png"


def check_contact_sheet(path: Path, overwrite: bool) -> None:
    """A PNG file that can be written: its folder exists, and it does not, unless `overwrite`."""
    if path.suffix.lower() != SHEET_SUFFIX and not path.is_dir():
        raise ConfigError(f"--contact-sheet {path}: expected a {SHEET_SUFFIX} file")
    check_output_file(path, "--contact-sheet", overwrite)


def read_manifest(output_dir: Path) -> list[dict]:
    """The mp4 records of OUTPUT_DIR's manifest, passing over lines that are not JSON records (cut short by a
    kill)."""
    manifest = output_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise ConfigError(f"no {manifest}; run sampling with this output folder first")
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{manifest} cannot be read ({error})") from None
    records, cut = [], 0
    for number, text in enumerate(lines, 1):
        name = manifest_file(text)
        if name is None:
            cut += bool(text.strip())
            continue
        record = json.loads(text)
        if isinstance(name, str) and name.endswith(".mp4"):
            if not isinstance(record.get("prompt"), str):
                raise ConfigError(f"{manifest} line {number}: {name} has no prompt")
            records.append(record)
    if cut:
        print(f"note: passed over {cut} line(s) of {manifest} that are not a JSON record of a file (cut short by a "
              "kill)", file=sys.stderr)
    return records


def read_videos(output_dir: Path, records: list[dict]) -> list[np.ndarray]:
    """The frames of every listed video; one missing or undecodable is an error naming it."""
    paths = [output_dir / record["file"] for record in records]
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: listed in {output_dir / MANIFEST_NAME} but not found")
    videos = []
    for path in paths:
        try:
            frames, _ = read_mp4(path)
        except (RuntimeError, decord.DECORDError) as error:
            raise ConfigError(f"{path}: listed in {output_dir / MANIFEST_NAME} but cannot be decoded (truncated or "
                              "not a video)") from error
        videos.append(frames)
    return videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--contact-sheet", type=Path, help="write a PNG of every video's frames here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --contact-sheet")
    parser.add_argument("--min-fraction", type=float, default=None,
                        help="exit 1 when any of the three measures is right for fewer than this fraction (> 0, <= 1)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = parser.parse_args()
    if args.min_fraction is not None:
        check_value("--min-fraction", args.min_fraction, number_rule(0, 1, exclusive=True))
    if args.contact_sheet:
        check_contact_sheet(args.contact_sheet, args.overwrite)
    records = read_manifest(args.output_dir)
    videos = read_videos(args.output_dir, records)

    totals, rows = {"colour_ok": 0, "one_shape_ok": 0, "direction_ok": 0}, []
    print(f"{'video':<44} {'colour':<16} {'shapes per frame':<22} direction")
    for record, frames in zip(records, videos):
        result = check_toy_video(frames, record["prompt"])
        for key in totals:
            totals[key] += result[key]
        mark = {True: "ok", False: "WRONG"}
        print(f"{record['file'][:44]:<44} {str(result['colour']):<7} {mark[result['colour_ok']]:<8} "
              f"{''.join(str(min(n, 9)) for n in result['shapes']):<13} {mark[result['one_shape_ok']]:<8} "
              f"{str(result['direction']):<6} {mark[result['direction_ok']]}")
        rows.append((frames, record["prompt"]))
    count = len(records)
    print(f"colour right: {totals['colour_ok']}/{count} | one shape per frame: {totals['one_shape_ok']}/{count} | "
          f"direction right: {totals['direction_ok']}/{count}")
    if args.contact_sheet and rows:
        with replaced_atomically(args.contact_sheet) as partial:
            contact_sheet(rows, partial, scale=max(1, 96 // rows[0][0].shape[1]))
        print(f"contact sheet: {args.contact_sheet}")
    if args.min_fraction is not None and (not count or min(totals.values()) / count < args.min_fraction):
        print(f"below --min-fraction {args.min_fraction:g}: fewest right {min(totals.values())}/{count}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_entrypoint(main)
