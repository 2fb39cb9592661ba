"""A dataset for the non-finite guard test: the SFT dataset with NaN pixels in sample 3."""

from satvideo.data import SFTDataset


class NaNAtSample(SFTDataset):
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if index == 3:
            item["mp4"] = item["mp4"] * float("nan")
        return item
