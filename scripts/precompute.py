"""Precompute the VAE posterior moments and text features of a training set (see satvideo/data/cache.py).

    python scripts/precompute.py --out data/toy_cache --base configs/tiny/model.yaml configs/tiny/vae.yaml \
        configs/tiny/train.yaml args.train_data=[data/toy]

Then train with `data.target=satvideo.data.CachedDataset args.train_data=[data/toy_cache]`.
"""

import argparse
import sys

import torch

from satvideo import distributed
from satvideo.cli import is_config_file, run_entrypoint
from satvideo.config import args_namespace, instantiate_from_config, load_config, to_plain
from satvideo.data.cache import write_cache
from satvideo.data.sources import build_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--base", nargs="+", required=True, help="YAML files, then key=value overrides")
    parser.add_argument("--debug", action="store_true")
    options = parser.parse_args()
    config = load_config([item for item in options.base if is_config_file(item)],
                         [item for item in options.base if not is_config_file(item)])
    args = args_namespace(config)
    device = distributed.init_device(args.device)
    dataset = build_dataset(config, args.train_data, "args.train_data")
    torch.manual_seed(args.seed)  # parts without weight files are built as training builds them
    vae = instantiate_from_config(config.model.first_stage_config).eval().to(device)
    conditioner = instantiate_from_config(config.model.conditioner_config).eval().to(device)
    made_with = {"first_stage_config": to_plain(config.model.first_stage_config),
                 "conditioner_config": to_plain(config.model.conditioner_config)}
    count = write_cache(vae, conditioner, dataset, options.out, config.data.params, made_with)
    print(f"cached {count} clips in {options.out}", flush=True)


if __name__ == "__main__":
    run_entrypoint(main)
