"""Datasets from `args.train_data` / `args.valid_data`: one per path, mixed by `args.train_data_weights`.

The `data` section names the dataset and its params. For video-caption datasets (ClipDataset subclasses,
SFTDataset in the official configs) each path picks its reader by its form, with the same params: a folder in the
SFT layout, a `.jsonl` manifest, or tar shards (a `.tar` file, a folder of them, a brace pattern). Weights follow
SwissArmyTransformer's `ConcatDataset`: a source of n samples with weight w takes int(n * w) slots of the mixture,
its samples repeated in order, and the seeded per-epoch order draws from all slots alike.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset

from satvideo.config import (ConfigError, check_parameters, drop_keys_without_effect, get_obj_from_str,
                             instantiate_from_config, resolve_target, to_plain)
from satvideo.data.buckets import assign_buckets, members_of_buckets
from satvideo.data.clips import ClipDataset
from satvideo.data.manifest import ManifestDataset
from satvideo.data.shards import TarShardDataset

DATA_KEYS = ("target", "params", "max_bad_share")


def clip_reader_for(path: str, configured: type) -> type:
    """The ClipDataset class that reads `path`: a manifest, tar shards, or the configured one (folders)."""
    if path.endswith(".jsonl"):
        return ManifestDataset
    if path.endswith(".tar") or (Path(path).is_dir() and any(Path(path).glob("*.tar"))):
        return TarShardDataset
    return configured


def model_reads_images(config: DictConfig) -> bool:
    """Whether the model reads a sample's own first-frame image (image-to-video); for others a bad one is no harm."""
    return bool((config.get("model") or {}).get("noised_image_input"))


def clip_source(path: str, configured: type, params: dict, reads_images: bool = True) -> ClipDataset:
    """The video-caption dataset of one path, its samples assigned to buckets when buckets are configured."""
    dataset = clip_reader_for(path, configured)(path, **params)
    dataset.reads_images = reads_images
    if dataset.buckets:
        assign_buckets(dataset, dataset.buckets)
    return dataset


class WeightedConcat(Dataset):
    """Sources side by side, source i taking int(len_i * weight_i) slots (SAT's ConcatDataset)."""

    def __init__(self, datasets: list[Dataset], weights: list[float]):
        self.datasets = datasets
        self.sizes = [int(len(dataset) * weight) for dataset, weight in zip(datasets, weights)]
        self.ends = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes))]

    def __len__(self) -> int:
        return self.ends[-1]

    def locate(self, index: int) -> tuple[Dataset, int]:
        source = bisect.bisect_right(self.ends, index)
        start = self.ends[source - 1] if source else 0
        return self.datasets[source], (index - start) % len(self.datasets[source])

    def __getitem__(self, index: int) -> dict:
        dataset, local = self.locate(index)
        return dataset[local]

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source) of every slot, as `locate` gives them: two arrays [len(self)]."""
        sources = np.repeat(np.arange(len(self.sizes)), self.sizes)
        local = np.concatenate([np.arange(size) % len(dataset) for size, dataset in zip(self.sizes, self.datasets)])
        return sources, local


def check_weights(weights, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = list(to_plain(weights)) if not isinstance(weights, (int, float)) else [weights]
    if len(weights) != count or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        raise ConfigError(f"args.train_data_weights={weights}: expected {count} positive numbers, one per "
                          "args.train_data path")
    return [float(w) for w in weights]


def build_dataset(config: DictConfig, paths: str | list[str] | None, key: str, weights=None) -> Dataset:
    """The `data` section's dataset for each path of `key` (args.train_data or args.valid_data), mixed."""
    if not paths:
        raise ConfigError(f"{key}: give one or more dataset paths")
    if "data" not in config:
        raise ConfigError("the config has no `data` section (target/params of the dataset)")
    data = to_plain(config.data)
    for name in data:
        if name not in DATA_KEYS:
            raise ConfigError(f"unknown key data.{name}: the data section holds {', '.join(DATA_KEYS)}")
    part = {name: data[name] for name in ("target", "params") if name in data}
    configured = get_obj_from_str(resolve_target(part["target"])) if "target" in part else None
    paths = [paths] if isinstance(paths, str) else [str(path) for path in paths]
    weights = check_weights(weights, len(paths))
    datasets = []
    for path in paths:
        try:
            if isinstance(configured, type) and issubclass(configured, ClipDataset):
                datasets.append(clip_source(path, configured, clip_params(part), model_reads_images(config)))
            else:
                datasets.append(instantiate_from_config(part, data_dir=path))
        except (FileNotFoundError, ValueError) as error:  # ConfigError included: name the path
            raise ConfigError(f"{key} {path}: {error}") from error
    if len(datasets) == 1 and weights == [1.0]:
        return datasets[0]
    check_slots(key, paths, datasets, weights)
    return WeightedConcat(datasets, weights)


def check_slots(key: str, paths: list[str], datasets: list[Dataset], weights: list[float]) -> None:
    """Every source of a mixture takes at least one slot of it."""
    for path, dataset, weight in zip(paths, datasets, weights):
        if len(dataset) == 0:
            raise ConfigError(f"{key} {path}: holds no samples")
        if int(len(dataset) * weight) == 0:
            raise ConfigError(f"args.train_data_weights: {path} holds {len(dataset)} samples, which at weight "
                              f"{weight:g} take no slot of the mixture (int(samples * weight) = 0); raise its weight")


def clip_params(part: dict) -> dict:
    """The data params, checked as instantiate_from_config checks them (every reader takes ClipDataset's)."""
    params = drop_keys_without_effect(part["target"], dict(part.get("params") or {}), label=f"{part['target']} params")
    check_parameters(ClipDataset.__init__, params, f"{part['target']} params")
    return params


def leaf_datasets(dataset: Dataset) -> list[Dataset]:
    """The sources inside a (possibly mixed) dataset."""
    return list(dataset.datasets) if isinstance(dataset, WeightedConcat) else [dataset]


def bucket_groups(dataset: Dataset) -> list[np.ndarray] | None:
    """The indices of `dataset` (mixed or not) in each bucket, or None without buckets. A bucketed source (a
    ClipDataset with buckets, a CachedDataset of bucketed clips) has `groups`, its indices per bucket, and
    `bucket_of`, the bucket of each index; the sources of a mix share the data params, so their buckets agree."""
    sources = leaf_datasets(dataset)
    if not all(getattr(source, "groups", None) is not None for source in sources):
        return None
    if not isinstance(dataset, WeightedConcat):
        return dataset.groups
    source_of, local = dataset.slots()
    bucket = np.empty(len(dataset), dtype=np.int64)
    for number, source in enumerate(sources):
        mine = source_of == number
        bucket[mine] = source.bucket_of[local[mine]]
    return members_of_buckets(bucket, len(sources[0].groups))
