"""Measure sampled toy videos against their prompts (models trained on the toy dataset): per video the colour of
the shape, the number of shapes per frame and the direction of motion, as a table with totals. Reads
OUTPUT_DIR/manifest.jsonl as written by sample_video.py; `--contact-sheet PNG` also lays the videos out frame by
frame with their prompts."""

import argparse
import json
import sys
from pathlib import Path

from satvideo.data.toy import check_toy_video
from satvideo.data.video import read_mp4
from satvideo.sampling import MANIFEST_NAME, contact_sheet


def read_manifest(output_dir: Path) -> list[dict]:
    manifest = output_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise SystemExit(f"error: no {manifest}; run sampling with this output folder first")
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--contact-sheet", type=Path, help="write a PNG of every video's frames here")
    parser.add_argument("--min-fraction", type=float, default=None,
                        help="exit 1 when any of the three measures is right for fewer than this fraction")
    args = parser.parse_args()

    records = [record for record in read_manifest(args.output_dir) if record["file"].endswith(".mp4")]
    totals, rows = {"colour_ok": 0, "one_shape_ok": 0, "direction_ok": 0}, []
    print(f"{'video':<44} {'colour':<16} {'shapes per frame':<22} direction")
    for record in records:
        frames, _ = read_mp4(args.output_dir / record["file"])
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
        contact_sheet(rows, args.contact_sheet, scale=max(1, 96 // rows[0][0].shape[1]))
        print(f"contact sheet: {args.contact_sheet}")
    if args.min_fraction is not None and (not count or min(totals.values()) / count < args.min_fraction):
        sys.exit(1)


if __name__ == "__main__":
    main()
