"""Write the synthetic toy dataset (coloured shapes moving over a dark background) in the SFT layout."""

import argparse
import time

from satvideo.data.toy import make_toy_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="dataset folder; videos/ and labels/ are created in it")
    parser.add_argument("--num", type=int, default=64, help="number of videos")
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels (even)")
    parser.add_argument("--frames", type=int, default=17, help="frames per video")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    written = make_toy_dataset(args.out, args.num, args.size, args.frames, args.fps, args.seed)
    print(f"wrote {len(written)} videos to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
