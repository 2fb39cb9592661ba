"""Precompute the VAE posterior moments and text features of a training set (see satvideo/data/cache.py).

    python scripts/precompute.py --out data/toy_cache --base configs/tiny/model.yaml configs/tiny/vae.yaml \
        configs/tiny/train.yaml args.train_data=[data/toy]
    torchrun --nproc_per_node=8 scripts/precompute.py --out cache/ --base ...   # each rank a share of the clips

Each distinct sample of args.train_data (mixed by args.train_data_weights or not) is encoded once, in the run's
precision; bad samples are counted by reason, and each one's row in the manifest (cache.json) names the clip that
stands in for it when training reads the videos, so the cache mixes sources and buckets exactly as they do. The
manifest is written last, after every rank has finished. Then train with
`data.target=satvideo.data.CachedDataset args.train_data=[cache/]`.

The cache is built beside --out and moved into place only when complete and judged as training would judge its
data (data.max_bad_share): a run that fails or is killed leaves an earlier cache there as it was. An --out that holds
anything is refused unless --overwrite, and even then only when it is a cache.
"""

import argparse
from functools import partial
from pathlib import Path

import torch

from satvideo import distributed
from satvideo.cli import check_output_folder, is_config_file, other_entries, run_entrypoint
from satvideo.config import ConfigError, TrainingError, args_namespace, load_config
from satvideo.data.cache import MANIFEST, SHARDS, CacheSource, cache_key, source_paths, write_cache
from satvideo.data.clips import ClipDataset
from satvideo.data.sources import build_dataset, check_slots, check_weights, leaf_datasets
from satvideo.engine import build_frozen_parts, check_encode_chunk_frames, place_frozen_parts
from satvideo.training.deepspeed_setup import deepspeed_config, training_dtype
from satvideo.training.guards import DEFAULT_MAX_BAD_SHARE, BadDataGuard

CACHE_FILES = (MANIFEST, SHARDS, "[0-9]*.safetensors")  # with the per-clip files of the first layout


def cache_sources(config, args) -> list[CacheSource]:
    """Each path of args.train_data with its weight and its dataset; a path named twice shares one dataset."""
    paths = source_paths(args.train_data)
    unique = list(dict.fromkeys(paths))
    datasets = dict(zip(unique, leaf_datasets(build_dataset(config, unique, "args.train_data"))))
    for path, dataset in datasets.items():
        if not isinstance(dataset, ClipDataset):
            raise ConfigError(f"args.train_data {path}: precompute reads video datasets (data.target a ClipDataset "
                              f"such as satvideo.data.SFTDataset), not {type(dataset).__name__}")
    weights = check_weights(args.train_data_weights, len(paths))
    if len(paths) > 1 or weights != [1.0]:  # as training from the videos mixes them
        check_slots("args.train_data", paths, [datasets[path] for path in paths], weights)
    return [CacheSource(path, weight, datasets[path]) for path, weight in zip(paths, weights)]


def check_out(out: Path, overwrite: bool) -> None:
    """--out is written in place of a folder, never through a link, and --overwrite replaces only a cache: a
    folder that holds anything besides cache.json and shards is refused, naming what else it holds."""
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; give the folder it points to ({out.resolve()})")
    check_output_folder(str(out), "--out", overwrite)
    others = other_entries(out, CACHE_FILES) if out.is_dir() else ""
    if others:
        raise ConfigError(f"--out {out} holds files that are not part of a cache ({others}); --overwrite replaces "
                          "only a cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace the cache in --out (once the new one is "
                                                                  "complete)")
    parser.add_argument("--base", nargs="+", required=True, help="YAML files, then key=value overrides")
    parser.add_argument("--clips-per-shard", type=int, default=256, help="clips in each shard file (default 256)")
    parser.add_argument("--debug", action="store_true")
    options = parser.parse_args()
    if options.clips_per_shard < 1:
        raise ConfigError(f"--clips-per-shard={options.clips_per_shard}: expected a whole number >= 1")
    check_out(Path(options.out), options.overwrite)
    config = load_config([item for item in options.base if is_config_file(item)],
                         [item for item in options.base if not is_config_file(item)])
    args = args_namespace(config)
    device = distributed.init_device(args.device)
    sources = cache_sources(config, args)
    dtype = training_dtype(deepspeed_config(config, args, device.type == "cuda"))
    key = cache_key(config, args, dtype)
    torch.manual_seed(args.seed)  # parts without weight files are built as training builds them
    conditioner, vae = build_frozen_parts(config.model.conditioner_config, config.model.first_stage_config)
    check_encode_chunk_frames(vae, config.model.get("encode_chunk_frames"))  # before any clip is encoded
    place_frozen_parts(conditioner, vae, device, dtype)
    judge = partial(check_bad_share, guard=BadDataGuard(config.data.get("max_bad_share", DEFAULT_MAX_BAD_SHARE)),
                    out=options.out)
    manifest = write_cache(vae, conditioner, sources, options.out, key, options.clips_per_shard,
                           config.model.get("encode_chunk_frames"), bool(config.model.get("noised_image_input")),
                           accept=judge)
    if distributed.is_main_process():
        skipped = manifest["skipped"]
        left_out = ", ".join(f"{reason} {count}" for reason, count in skipped.items()) or "none"
        frames = " with their first frames" if manifest["first_frames"] else ""
        print(f"cached {manifest['count']} clips{frames} in {options.out} ({len(manifest['shards'])} shards by "
              f"{distributed.world_size()} rank(s), key {manifest['key_sha256'][:12]}); bad samples, each stood in "
              f"for by a clip of its source: {sum(skipped.values())} ({left_out})", flush=True)


def check_bad_share(manifest: dict, guard: BadDataGuard, out: str) -> None:
    """As training from the videos would stop, the new cache does not replace what --out holds: no clip at all, a
    sample for which no clip of its source (and bucket) can stand in, or more bad draws in an epoch of the mixture
    (each source's `draws` and `bad_draws`, as WeightedConcat draws them) than `guard` (data.max_bad_share) allows."""
    good, reasons = manifest["count"], ", ".join(f"{reason} {count}" for reason, count in manifest["skipped"].items())
    if good == 0:
        raise ConfigError(f"no clip of args.train_data could be cached ({reasons}); scripts/check_dataset.py lists "
                          "the files")
    unusable = manifest["unusable"]
    if unusable:
        raise TrainingError(f"precompute ({good} clips encoded, not written to {out}): no clip of its source and shape "
                            f"can stand in for {len(unusable)} samples, the first {unusable[0]} ({reasons}); training "
                            "from the videos would stop there: scripts/check_dataset.py lists the files")
    drawn = sum(source["draws"] for source in manifest["sources"])
    bad = sum(source["bad_draws"] for source in manifest["sources"])
    if guard.too_many(bad, drawn):
        raise TrainingError(f"precompute ({good} clips encoded, not written to {out}): an epoch of the mixture draws "
                            f"{drawn} samples, {bad} of them bad ({bad / drawn:.1%}, above data.max_bad_share="
                            f"{guard.max_bad_share:g}): {reasons}; scripts/check_dataset.py lists the files")


if __name__ == "__main__":
    run_entrypoint(main)
