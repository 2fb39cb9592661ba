"""Datasets and video files."""

from satvideo.data.sft import SFTDataset

__all__ = ["SFTDataset"]
