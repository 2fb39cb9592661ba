"""Report whether sampled videos show the colour their prompt names (for models trained on the toy
dataset). Reads OUTPUT_DIR/manifest.jsonl as written by the sampling entrypoint."""

import argparse
import json
import sys
from pathlib import Path

from satvideo.data.toy import dominant_palette_colour, palette_colour_in
from satvideo.data.video import read_mp4
from satvideo.sampling import MANIFEST_NAME


def read_manifest(output_dir: Path) -> list[dict]:
    manifest = output_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise SystemExit(f"error: no {manifest}; run sampling with this output folder first")
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--min-fraction", type=float, default=None, help="exit 1 when the match fraction is below this")
    args = parser.parse_args()

    matches = checked = 0
    for record in read_manifest(args.output_dir):
        expected = palette_colour_in(record["prompt"])
        if expected is None:
            print(f"{record['file']}: skipped, prompt names no palette colour: {record['prompt']!r}")
            continue
        frames, _ = read_mp4(args.output_dir / record["file"])
        found = dominant_palette_colour(frames)
        checked += 1
        matches += found == expected
        print(f"{record['file']}: expected {expected}, found {found or 'no bright colour'}"
              f" -> {'match' if found == expected else 'MISMATCH'}")
    print(f"colour match: {matches}/{checked}")
    if args.min_fraction is not None and (checked == 0 or matches / checked < args.min_fraction):
        sys.exit(1)


if __name__ == "__main__":
    main()
