"""A cache of what the frozen parts compute for each training clip, so that an iteration costs only the
transformer: the VAE posterior moments (mean and log-variance, unscaled) and the text encoder's features.

    {cache}/cache.json          clip count, the data params and frozen parts it was made with
    {cache}/{i:06d}.safetensors  moments [2C, T', h, w], text_features [L, D]; caption and padding as metadata

Training from the cache draws latents from the cached posterior (or takes its mean, as the regularizer is
configured) and applies caption dropout to the cached features, so it trains as from the videos. Make one with
`scripts/precompute.py`, then train with `data.target=satvideo.data.CachedDataset` and
`args.train_data=[{cache}]`; the data params must equal those the cache was made with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from satvideo.config import ConfigError, to_plain

INDEX = "cache.json"


@torch.no_grad()
def write_cache(vae: torch.nn.Module, conditioner: torch.nn.Module, dataset: Dataset, out_dir: str | Path,
                data_params: dict, made_with: dict) -> int:
    """Encode every clip of `dataset` once; returns the number of clips written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(vae.parameters()).device
    for index in range(len(dataset)):
        item = dataset[index]
        video = item["mp4"][None].permute(0, 2, 1, 3, 4).to(device, next(vae.parameters()).dtype)  # [1, 3, T, H, W]
        moments = vae.encoder(video)[0].float().cpu().contiguous()
        features = conditioner({"txt": [item["txt"]]})["crossattn"][0].float().cpu().contiguous()
        save_file({"moments": moments, "text_features": features}, str(out_dir / f"{index:06d}.safetensors"),
                  metadata={"caption": item["txt"], "padded_frames": str(item.get("padded_frames", 0))})
    index = {"count": len(dataset), "data_params": to_plain(data_params), "made_with": made_with}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    return len(dataset)


class CachedDataset(Dataset):
    """Items {"moments", "text_features", "txt", "padded_frames"} of a cache; the data params given (the config's
    `data.params`) must equal those the cache was made with."""

    def __init__(self, data_dir: str, **data_params):
        self.folder = Path(data_dir)
        if not (self.folder / INDEX).is_file():
            raise ConfigError(f"{self.folder} is not a cache (no {INDEX}); make one with scripts/precompute.py")
        index = json.loads((self.folder / INDEX).read_text())
        for key, value in data_params.items():
            cached = index["data_params"].get(key)
            if to_plain(value) != cached:
                raise ConfigError(f"data.params.{key}={to_plain(value)!r} but the cache {self.folder} was made with "
                                  f"{cached!r}: make the cache again")
        self.count = index["count"]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        path = self.folder / f"{index:06d}.safetensors"
        tensors = load_file(path)
        with open(path, "rb") as file:  # safetensors keeps metadata in its JSON header
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))["__metadata__"]
        return {"moments": tensors["moments"], "text_features": tensors["text_features"], "txt": header["caption"],
                "padded_frames": int(header["padded_frames"])}
