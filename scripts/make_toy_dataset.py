"""Write the synthetic toy dataset (coloured shapes moving over a dark background) in the SFT layout."""

import argparse
import time
from pathlib import Path

from satvideo.atomic_files import folder_replaced_atomically
from satvideo.cli import check_output_folder, other_entries, run_entrypoint
from satvideo.config import ARGS_RULES, ConfigError, check_value, whole_rule
from satvideo.data.toy import MIN_SIZE, TOY_ENTRIES, check_toy_params, make_toy_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True,
                        help="dataset folder to create (or an empty one); videos/ and labels/ are written in it")
    parser.add_argument("--num", type=int, default=64, help="number of videos")
    parser.add_argument("--size", type=int, default=64, help=f"frame height and width in pixels (even, >= {MIN_SIZE})")
    parser.add_argument("--frames", type=int, default=17, help="frames per video")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (one that holds nothing but videos/ and labels/)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = parser.parse_args()
    check_output_folder(args.out, "--out", args.overwrite)
    out = Path(args.out)
    foreign = other_entries(out, TOY_ENTRIES) if out.is_dir() else ""
    if foreign:  # --overwrite replaces an earlier toy dataset, not a folder that holds other things
        raise ConfigError(f"--out {args.out} holds {foreign}, which this tool does not write; give a new or empty "
                          "folder")
    check_value("--num", args.num, whole_rule(1))
    check_value("--seed", args.seed, ARGS_RULES["seed"])
    check_toy_params(args.size, args.frames, args.fps, ("--size", "--frames", "--fps"))
    start = time.perf_counter()
    # Resolved, so that a relative --out such as `.` has a name to put the partial folder beside.
    with folder_replaced_atomically(Path(args.out).resolve()) as partial:
        written = make_toy_dataset(partial, args.num, args.size, args.frames, args.fps, args.seed)
    print(f"wrote {len(written)} videos to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_entrypoint(main)
