"""Datasets and video files."""

from satvideo.data.cache import CachedDataset
from satvideo.data.manifest import ManifestDataset
from satvideo.data.sft import SFTDataset
from satvideo.data.shards import TarShardDataset

__all__ = ["CachedDataset", "ManifestDataset", "SFTDataset", "TarShardDataset"]
