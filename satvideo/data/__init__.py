"""Datasets and video files."""

from satvideo.data.cache import CachedDataset
from satvideo.data.sft import SFTDataset

__all__ = ["CachedDataset", "SFTDataset"]
