"""Datasets from `args.train_data` / `args.valid_data`: the `data` section's dataset, built once per folder."""

from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, Dataset

from satvideo.config import ConfigError, instantiate_from_config


def build_dataset(config: DictConfig, folders: str | list[str] | None, key: str) -> Dataset:
    """The `data` section's dataset for each folder of `key` (args.train_data or args.valid_data), concatenated."""
    if not folders:
        raise ConfigError(f"{key}: give one or more dataset folders")
    if "data" not in config:
        raise ConfigError("the config has no `data` section (target/params of the dataset)")
    datasets = []
    for folder in [folders] if isinstance(folders, str) else list(folders):
        try:
            datasets.append(instantiate_from_config(config.data, data_dir=folder))
        except (FileNotFoundError, ValueError) as error:  # ConfigError included: name the folder
            raise ConfigError(f"{key} {folder}: {error}") from error
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
