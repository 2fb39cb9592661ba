"""A cache of what the frozen parts compute for each training clip, so that an iteration costs only the
transformer: the VAE posterior moments (mean and log-variance, unscaled) and the text encoder's features.

    {cache}/shard-{rank:03d}-{n:05d}.safetensors  up to --clips-per-shard clips each, written by rank `rank`:
                                                 tensors `{id}.moments` [2C, T', h, w] and `{id}.text_features`
                                                 [L, D] in the run's precision (for image-to-video models also
                                                 `{id}.first_frame` [3, H, W], the conditioning frame in pixels),
                                                 metadata `{id}.caption` and `{id}.padded_frames`
    {cache}/cache.json                           the manifest: the clip count; for each sample the shard, key,
                                                 latent shape and bucket (with buckets) of the clip training from
                                                 the videos loads for it (a bad sample's stand-in); the sources,
                                                 their weights, row ranges and bad samples; the bad samples by
                                                 reason; whether it holds first frames; and the KEY (all that
                                                 decides what the cache holds) with its sha256

`scripts/precompute.py` writes it; under torchrun rank r encodes every world_size-th sample. Rank 0 writes the
manifest, atomically, only after every rank has finished, so a cache without cache.json is an interrupted one,
and it is refused. Training from it (`data.target=satvideo.data.CachedDataset`, `args.train_data=[{cache}]`)
builds no T5 (nor, for a text-to-video model, the VAE): the KEY is checked against the config without loading any
weights (`check_caches`: weight files are fingerprinted, see `file_fingerprint`; parts built from a seed without
files are identified by their settings), and CachedDataset checks the data params. A refusal names what changed.

Training draws latents from the cached posterior (or takes its mean, as the regularizer is configured) and applies
caption dropout to the cached features; an image-to-video model noises the cached first frame and encodes it at
every step. So it trains as from the videos (tests/test_cache.py: the same losses).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from satvideo import distributed
from satvideo.atomic_files import folder_replaced_atomically, partial_folder, write_text_atomically
from satvideo.config import (ConfigError, TrainingError, check_parameters, drop_keys_without_effect, get_obj_from_str,
                             is_number, is_whole_number, resolve_target, to_plain)
from satvideo.data.buckets import members_of_buckets
from satvideo.data.clips import ClipDataset
from satvideo.data.health import BadSample, FirstOfEachReason, tally_dict, tally_of
from satvideo.data.packed import PackedList
from satvideo.data.sources import WeightedConcat, model_reads_images

logger = logging.getLogger(__name__)

MANIFEST = "cache.json"
SHARD_KEY = "cache_key_sha256"  # shard metadata: the sha256 of the key of the cache the shard was written for
FORMAT = 3  # 1: one safetensors file per clip, no key; 2: rows for good clips only, encoder settings as written
SHARDS = "shard-*.safetensors"
VAE_WEIGHTS = "the VAE weights (model.first_stage_config.params.ckpt_path)"
# Weight files are fingerprinted by their size and SAMPLED_BLOCKS blocks of BLOCK bytes spread over them.
BLOCK = 2**20
SAMPLED_BLOCKS = 16
REMAKE = "make it again with scripts/precompute.py"
MAX_SLOTS = 2**40  # slots of one source in a mixture: far beyond any dataset, far below what overflows
MANIFEST_FIELDS = ("key", "key_sha256", "shards", "clips", "sources", "text_widths")  # what training reads


# --- the key: what decides the cache's contents ---------------------------------------------------------------


def file_fingerprint(path: Path) -> dict:
    """{"size", "sha256"} of a weight file: the sha256 of its size and of 16 blocks of 1 MiB spread evenly from its
    first byte to its last (all of it when smaller than that).

    Content, not path or modification time: a copy of the same weights elsewhere (another machine, another
    folder) still matches its cache. 16 MiB are read whatever the size, milliseconds against a full hash's seconds
    to minutes for T5-XXL's 9.5-19 GB on every rank at every start; different trainings of a model differ in every
    block, and a safetensors file's first block holds its header (names, shapes, offsets).
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        if size <= BLOCK * SAMPLED_BLOCKS:
            digest.update(file.read())
        else:
            for block in range(SAMPLED_BLOCKS):
                file.seek((size - BLOCK) * block // (SAMPLED_BLOCKS - 1))
                digest.update(file.read(BLOCK))
    return {"size": size, "sha256": digest.hexdigest()}


def folder_fingerprint(folder: Path) -> dict[str, dict]:
    """file_fingerprint of every file of a model folder (weights, config, tokenizer), by relative path; hidden
    files and folders (download caches, locks) are left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[str(relative)] = file_fingerprint(path)
    return files


def resolved_params(factory: Callable, params: dict) -> dict:
    """`params` with the defaults of `factory`'s signature filled in, as JSON values: a setting written out and
    the same setting left to its default compare equal."""
    values = {name: parameter.default for name, parameter in inspect.signature(factory).parameters.items()
              if parameter.default is not inspect.Parameter.empty}
    values.update(to_plain(params))
    return json.loads(json.dumps(values))


def data_key(data_params: dict) -> dict:
    """`data.params.<name>` -> value for every parameter of a video dataset (ClipDataset's, defaults included):
    which frames a clip gives, at what size, and its caption."""
    data_params = dict(to_plain(data_params) or {})
    check_parameters(ClipDataset.__init__, data_params, "data.params")
    return {f"data.params.{name}": value for name, value in resolved_params(ClipDataset.__init__, data_params).items()}


def vae_weights(vae_params: dict, seed: int) -> dict:
    """The fingerprint of the VAE checkpoint the config points to; without one, the seed the VAE is built from
    (training and precompute build it from args.seed, see engine.build_frozen_parts)."""
    ckpt_path = vae_params.get("ckpt_path")
    if ckpt_path is None:
        return {"random_init_seed": seed}
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"model.first_stage_config.params.ckpt_path={ckpt_path!r} is not a file")
    return {"file": file_fingerprint(path), "ignore_keys": list(vae_params.get("ignore_keys") or [])}


def text_encoder_weights(params: dict, where: str) -> dict:
    """The fingerprint of a text encoder's model folder (`model_dir`); an encoder without one is built from its
    settings (TinyT5Embedder: sizes and a seed), which then stand for its weights."""
    if "model_dir" not in params:
        return {"settings": {name: value for name, value in params.items() if name != "max_length"}}
    folder = Path(params["model_dir"])
    if not folder.is_dir():
        raise ConfigError(f"{where}.params.model_dir={params['model_dir']!r} is not a directory")
    return {"files": folder_fingerprint(folder)}


def encoder_settings(encoder_config: dict | None) -> dict:
    """The VAE encoder's class and every parameter (defaults included, official keys without effect left out), by
    config key: an encoder written another way but built the same compares equal, and a change is named exactly."""
    where = "model.first_stage_config.params.encoder_config"
    if not isinstance(encoder_config, dict) or "target" not in encoder_config:
        return {where: encoder_config}
    target = resolve_target(encoder_config["target"])
    factory = get_obj_from_str(target)
    params = drop_keys_without_effect(target, dict(encoder_config.get("params") or {}))
    settings = {f"{where}.target": f"{factory.__module__}.{factory.__qualname__}"}
    settings.update({f"{where}.params.{name}": value for name, value in resolved_params(factory, params).items()})
    return settings


def frozen_parts_key(model_config: DictConfig | dict, seed: int) -> dict:
    """What decides the cached moments and features besides the clips, by config key (or, for weights, by a
    description): the VAE encoder's settings, `model.encode_chunk_frames`, each text encoder's target and
    `max_length`, and the weights of both (fingerprints; none of them is loaded)."""
    model = to_plain(model_config)
    vae = model["first_stage_config"].get("params") or {}
    key = {**encoder_settings(vae.get("encoder_config")), "model.encode_chunk_frames": model.get("encode_chunk_frames"),
           VAE_WEIGHTS: vae_weights(vae, seed)}
    for index, embedder in enumerate(model["conditioner_config"]["params"]["emb_models"]):
        where = f"model.conditioner_config.params.emb_models.{index}"
        params = resolved_params(get_obj_from_str(embedder["target"]), embedder.get("params") or {})
        key[f"{where}.target"] = resolve_target(embedder["target"])
        key[f"{where}.params.max_length"] = params.get("max_length")
        key[f"the text encoder weights ({where})"] = text_encoder_weights(params, where)
    return key


def cache_key(config: DictConfig, args, precision: torch.dtype) -> dict:
    """The KEY of a cache of `args.train_data` (see the module docstring); training compares its "data" and
    "frozen" parts with its own config, "sources" and "precision" only tell caches apart."""
    weights = to_plain(args.train_data_weights)
    return {"data": data_key(config.data.get("params")), "frozen": frozen_parts_key(config.model, args.seed),
            "sources": {"paths": [str(Path(path).resolve()) for path in source_paths(args.train_data)],
                        "weights": weights},
            "precision": str(precision).removeprefix("torch.")}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def source_paths(paths) -> list[str]:
    paths = to_plain(paths) or []
    return [paths] if isinstance(paths, str) else [str(path) for path in paths]


def change_message(folder: Path, name: str, cached, current) -> str:
    """One line naming what differs between a cache's key entry and the config's."""
    if name.startswith("the "):  # weights
        return f"{name} differ from those the cache {folder} was made with: {REMAKE}"
    if isinstance(cached, dict) or isinstance(current, dict):
        return f"{name} differs from the one the cache {folder} was made with: {REMAKE}"
    return f"the cache {folder} was made with {name}={cached!r}, the config says {current!r}: {REMAKE}"


def check_key(folder: Path, cached: dict, current: dict) -> None:
    """ConfigError naming the first entry of `current` that differs from the cache's (read back from JSON)."""
    for name, value in json.loads(json.dumps(current)).items():
        if cached.get(name) != value:
            raise ConfigError(change_message(folder, name, cached.get(name), value))


# --- writing ------------------------------------------------------------------------------------------------


@dataclass
class CacheSource:
    """One path of args.train_data: its weight in the mix and its dataset (shared by paths named twice)."""

    path: str
    weight: float
    dataset: ClipDataset


@torch.no_grad()
def encode_clip(vae: nn.Module, conditioner: nn.Module, item: dict, chunk_frames: int | None,
                first_frame: bool = False) -> dict[str, torch.Tensor]:
    """{"moments" [2C, T', h, w], "text_features" [L, D], and with `first_frame` "first_frame" [3, H, W]} of a
    dataset item on the CPU, in the precision they were computed in (the run's: bf16 halves a 5B cache, 6.3
    instead of 12.7 MB per 49x480x720 clip; a first frame adds 2.1 MB)."""
    parameter = next(vae.parameters())
    video = item["mp4"][None].permute(0, 2, 1, 3, 4).to(parameter.device, parameter.dtype)  # [1, 3, T, H, W]
    tensors = {"moments": vae.moments(video, chunk_frames)[0],
               "text_features": conditioner({"txt": [item["txt"]]})["crossattn"][0]}
    if first_frame:
        tensors["first_frame"] = item["image"].to(parameter.dtype)
    return {name: tensor.cpu().contiguous() for name, tensor in tensors.items()}


class ShardWriter:
    """Clips into `shard-{rank:03d}-{n:05d}.safetensors` files of up to `clips_per_shard` clips each, each shard
    marked with the sha256 of its cache's key (SHARD_KEY in its metadata)."""

    def __init__(self, folder: Path, rank: int, clips_per_shard: int, key_sha256: str):
        self.folder, self.rank, self.clips_per_shard, self.key_sha256 = folder, rank, clips_per_shard, key_sha256
        self.tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.clips = 0  # in the shard being filled
        self.written = 0

    def add(self, clip_id: int, tensors: dict[str, torch.Tensor], caption: str, padded_frames: int) -> None:
        self.tensors.update({f"{clip_id}.{name}": tensor for name, tensor in tensors.items()})
        self.metadata.update({f"{clip_id}.caption": caption, f"{clip_id}.padded_frames": str(padded_frames)})
        self.clips += 1
        if self.clips == self.clips_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.tensors:
            return
        save_file(self.tensors, str(self.folder / f"shard-{self.rank:03d}-{self.written:05d}.safetensors"),
                  metadata={**self.metadata, SHARD_KEY: self.key_sha256})
        self.written += 1
        self.tensors, self.metadata, self.clips = {}, {}, 0


def distinct_datasets(sources: list[CacheSource]) -> list[ClipDataset]:
    """The datasets of the sources, each once, in order."""
    datasets: list[ClipDataset] = []
    for source in sources:
        if not any(source.dataset is dataset for dataset in datasets):
            datasets.append(source.dataset)
    return datasets


def encode_share(vae: nn.Module, conditioner: nn.Module, datasets: list[ClipDataset], writer: ShardWriter,
                 chunk_frames: int | None, first_frames: bool) -> list[BadSample]:
    """Encode this rank's share of the samples (every world_size-th, numbered across the datasets in order) into
    shards, with their first frames when `first_frames`; returns the bad samples left out."""
    numbered = [(dataset, index) for dataset in datasets for index in range(len(dataset))]
    rank, world_size = distributed.rank(), distributed.world_size()
    mine = range(rank, len(numbered), world_size)
    bad, report = [], FirstOfEachReason()
    for done, clip_id in enumerate(mine, 1):
        dataset, index = numbered[clip_id]
        try:
            item = dataset.load(index)  # not __getitem__, which would stand another sample in for a bad one
        except BadSample as error:
            report(error)
            bad.append(error)
            continue
        tensors = encode_clip(vae, conditioner, item, chunk_frames, first_frames)
        check_finite(tensors, dataset.names[index])
        writer.add(clip_id, tensors, item["txt"], item["padded_frames"])
        if done % max(1, len(mine) // 10) == 0:  # every tenth of the share
            logger.info("rank %d: %d of its %d samples encoded", rank, done, len(mine))
    writer.flush()
    return bad


def check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    """A NaN or inf is the frozen parts' failure (weights, or an overflow in fp16), not the clip's: it stops the
    precompute rather than go into every clip of the cache."""
    for tensor_name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise TrainingError(f"{name}: the {tensor_name} computed for it are not finite (NaN or inf): check the "
                                "VAE and text encoder weights, and their precision (args.fp16 overflows T5)")


def clips_in_shards(folder: Path) -> dict[int, tuple[str, list[int]]]:
    """Clip id -> (shard file, latent shape [C, T', h, w]) of every clip in the folder's shards (headers only)."""
    clips = {}
    for path in sorted(folder.glob(SHARDS)):
        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():
                clip_id, _, tensor = name.partition(".")
                if tensor == "moments":
                    channels, *rest = shard.get_slice(name).get_shape()
                    clips[int(clip_id)] = (path.name, [channels // 2, *rest])
    return clips


def manifest_of(folder: Path, key: dict, sources: list[CacheSource], text_widths: list[int],
                skipped: torch.Tensor, first_frames: bool) -> dict:
    """The manifest of the shards in `folder`: a row per sample, in sample order, each naming the clip training from
    the videos would load for it (a bad sample's row names its stand-in), and each source's range of rows; so the
    cache mixes and buckets its clips exactly as the videos are. Samples for which the videos would find no clip
    are listed under `unusable`, which precompute refuses."""
    clips = clips_in_shards(folder)
    datasets = distinct_datasets(sources)
    shards = sorted({shard for shard, _ in clips.values()})
    shard_index = {shard: index for index, shard in enumerate(shards)}
    rows, ranges, unusable, first_id = [], [], [], 0
    for dataset in datasets:
        start, stood_in = len(rows), np.zeros(len(dataset), dtype=bool)
        for index in range(len(dataset)):
            # the clip training from the videos loads for it: itself, or the stand-in the dataset hands out
            clip_id = next((first_id + candidate for candidate in dataset.candidates(index)
                            if first_id + candidate in clips), None)
            if clip_id is None:
                unusable.append(f"{dataset.names[index]} of shape {list(dataset.shape(index))}")
                continue
            stood_in[index] = clip_id != first_id + index
            shard, shape = clips[clip_id]
            row = {"shard": shard_index[shard], "key": str(clip_id), "latent_shape": shape}
            if dataset.bucket_of is not None:
                row["bucket"] = int(dataset.bucket_of[index])
            rows.append(row)
        ranges.append((start, len(rows), stood_in))
        first_id += len(dataset)
    source_rows = []
    for source in sources:
        start, end, stood_in = ranges[next(i for i, dataset in enumerate(datasets) if dataset is source.dataset)]
        _, drawn = WeightedConcat([stood_in], [source.weight]).slots()  # the samples an epoch draws
        source_rows.append({"path": source.path, "weight": source.weight, "start": start, "end": end,
                            "bad": int(stood_in.sum()), "draws": len(drawn), "bad_draws": int(stood_in[drawn].sum())})
    return {"format": FORMAT, "count": len(clips), "key": key, "key_sha256": key_hash(key),
            "text_widths": text_widths, "first_frames": first_frames, "sources": source_rows,
            "skipped": tally_dict(skipped), "unusable": unusable, "shards": shards, "clips": rows}


def write_cache(vae: nn.Module, conditioner: nn.Module, sources: list[CacheSource], out_dir: str | Path, key: dict,
                clips_per_shard: int = 256, chunk_frames: int | None = None, first_frames: bool = False,
                accept: Callable[[dict], None] | None = None) -> dict:
    """Encode every distinct sample of `sources` once (this rank: every world_size-th) into shards, with its first
    frame for an image-to-video model; after every rank has finished, rank 0 writes the manifest. Every rank takes
    part and gets the manifest.

    The cache is built in a folder beside `out_dir` and takes its place only when complete and accepted (`accept`,
    called on every rank with the manifest, raises to refuse it): until then an earlier cache there stays whole, and
    a run that fails leaves nothing of its own."""
    building = partial_folder(out_dir)
    main = distributed.is_main_process()
    with folder_replaced_atomically(out_dir) if main else nullcontext(building) as building:
        distributed.barrier()  # rank 0 has made the folder
        writer = ShardWriter(building, distributed.rank(), clips_per_shard, key_hash(key))
        bad = encode_share(vae, conditioner, distinct_datasets(sources), writer, chunk_frames, first_frames)
        skipped = tally_of(bad).to(next(vae.parameters()).device)
        if distributed.world_size() > 1:
            torch.distributed.all_reduce(skipped)
        distributed.barrier()
        if main:
            widths = [embedder.encoder.config.d_model for embedder in conditioner.embedders]
            manifest = manifest_of(building, key, sources, widths, skipped.cpu(), first_frames)
            write_text_atomically(building / MANIFEST, json.dumps(manifest, indent=1))
        distributed.barrier()
        manifest = parsed_manifest(building)
        if accept is not None:  # judged first: a refused cache may hold what training's checks refuse as well
            accept(manifest)
        checked_manifest(building, manifest)
        distributed.barrier()  # every rank has read the manifest before rank 0 moves the folder into place
    return manifest


# --- reading ------------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete cache; a one-line ConfigError for a folder that is none, an interrupted one (shards
    without a manifest), one in another layout, or one missing a shard."""
    return checked_manifest(folder, parsed_manifest(folder))


def parsed_manifest(folder: Path) -> dict:
    """The JSON object in the folder's manifest, unchecked; a one-line ConfigError when there is none."""
    path = folder / MANIFEST
    if not path.is_file():
        shards = list(folder.glob(SHARDS))
        if shards:
            raise ConfigError(f"the cache {folder} has {len(shards)} shards but no {MANIFEST}: its precompute did not "
                              f"finish; {REMAKE}")
        raise ConfigError(f"{folder} is not a cache (no {MANIFEST}): make one with scripts/precompute.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"the cache {folder}: {MANIFEST} cannot be read ({error}): {REMAKE}") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"the cache {folder}: {MANIFEST} holds no manifest: {REMAKE}")
    return manifest


def checked_manifest(folder: Path, manifest: dict) -> dict:
    """`manifest`, checked to be a complete one of this layout whose shards are all in `folder`."""
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"the cache {folder} is in another layout (format {manifest.get('format')!r}, this satvideo "
                          f"reads {FORMAT}): {REMAKE}")
    absent = [field for field in MANIFEST_FIELDS if field not in manifest]
    if absent:
        raise ConfigError(f"the cache {folder}: {MANIFEST} lacks {', '.join(absent)}: {REMAKE}")
    check_manifest_values(folder, manifest)
    missing = [shard for shard in manifest["shards"] if not (folder / shard).is_file()]
    if missing:
        raise ConfigError(f"the cache {folder} lacks {len(missing)} of its shards ({missing[0]} ...): {REMAKE}")
    return manifest


def check_manifest_values(folder: Path, manifest: dict) -> None:
    """The types and ranges of what training reads of a manifest, so that a damaged or hand-edited cache.json is
    refused at start in one line rather than met in a data worker, or read as other data."""
    def refuse(field: str, expected: str) -> None:
        raise ConfigError(f"the cache {folder}: {MANIFEST} field {field} is not {expected}: {REMAKE}")

    def whole(value, low: int, high: int) -> bool:
        return is_whole_number(value) and low <= value <= high

    key, shards, clips, sources = manifest["key"], manifest["shards"], manifest["clips"], manifest["sources"]
    if not (isinstance(key, dict) and all(isinstance(key.get(part), dict) for part in ("data", "frozen"))):
        refuse("key", "a mapping with the data and frozen keys")
    if not (isinstance(shards, list) and all(isinstance(shard, str) and Path(shard).name == shard
                                             and Path(shard).match(SHARDS) for shard in shards)):
        refuse("shards", f"a list of file names {SHARDS} in the cache folder")
    if not (isinstance(manifest["text_widths"], list) and all(whole(width, 1, 2**20)
                                                              for width in manifest["text_widths"])):
        refuse("text_widths", "a list of positive widths")
    if not isinstance(clips, list):
        refuse("clips", "a list")
    for number, clip in enumerate(clips):
        if not (isinstance(clip, dict) and whole(clip.get("shard"), 0, len(shards) - 1)
                and isinstance(clip.get("key"), str) and clip["key"].isdigit()
                and ("bucket" not in clip or whole(clip["bucket"], 0, 2**31))):
            refuse(f"clips[{number}]", f"a clip (a shard number below {len(shards)}, a numeric key, a bucket)")
    if not (isinstance(sources, list) and sources):
        refuse("sources", "a non-empty list")
    for number, source in enumerate(sources):
        if not (isinstance(source, dict) and whole(source.get("start"), 0, len(clips) - 1)
                and whole(source.get("end"), source["start"] + 1, len(clips))
                and is_number(source.get("weight")) and 1 <= (source["end"] - source["start"]) * source["weight"]
                < MAX_SLOTS):
            refuse(f"sources[{number}]", f"a source (rows start < end <= {len(clips)}, a weight that gives it a slot)")


def check_shards(folder: Path, manifest: dict) -> None:
    """Each shard's header opens, belongs to this cache (its key's sha256) and holds the tensors the manifest
    places in it: a damaged or swapped shard is refused at start, not met by a data worker mid-run."""
    tensors = ("moments", "text_features", "first_frame") if manifest.get("first_frames") else ("moments",
                                                                                                "text_features")
    expected: list[set[str]] = [set() for _ in manifest["shards"]]
    for clip in manifest["clips"]:
        expected[clip["shard"]].update(f"{clip['key']}.{tensor}" for tensor in tensors)
    for shard, names in zip(manifest["shards"], expected):
        try:
            with safe_open(str(folder / shard), framework="pt") as opened:
                key, held = (opened.metadata() or {}).get(SHARD_KEY), set(opened.keys())
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ConfigError(f"the cache {folder}: shard {shard} is damaged ({str(error).splitlines()[0][:120]}): "
                              f"{REMAKE}") from None
        if key != manifest.get("key_sha256"):
            raise ConfigError(f"the cache {folder}: shard {shard} was written for another cache (key {str(key)[:12]}, "
                              f"{MANIFEST} says {str(manifest.get('key_sha256'))[:12]}): {REMAKE}")
        if not names <= held:
            raise ConfigError(f"the cache {folder}: shard {shard} lacks {len(names - held)} of the tensors "
                              f"{MANIFEST} places in it ({min(names - held)} ...): {REMAKE}")


class CachedDataset(Dataset):
    """Items {"moments", "text_features", "txt", "padded_frames"} (and "image", the first frame, from a cache made
    for an image-to-video model) of a cache, its sources mixed by the weights it was made with (as WeightedConcat
    mixes the videos). The data params given (the config's `data.params`) must be those the cache was made with."""

    def __init__(self, data_dir: str, **data_params):
        self.folder = Path(data_dir)
        manifest = read_manifest(self.folder)
        check_key(self.folder, manifest["key"]["data"], data_key(data_params))
        self.shards: list[str] = manifest["shards"]
        check_shards(self.folder, manifest)
        self.first_frames = bool(manifest.get("first_frames"))
        self.clips = PackedList((clip["shard"], clip["key"]) for clip in manifest["clips"])  # [shard, key] each
        sources = manifest["sources"]
        self.order = WeightedConcat([range(source["start"], source["end"]) for source in sources],
                                    [source["weight"] for source in sources])
        # With buckets, as a bucketed ClipDataset: the bucket of each index [len(self)] and the indices of each bucket
        self.bucket_of: np.ndarray | None = None
        self.groups: list[np.ndarray] | None = None
        buckets = [clip["bucket"] for clip in manifest["clips"] if "bucket" in clip]
        if buckets and (len(buckets) != len(manifest["clips"]) or max(buckets) >= len(data_params["buckets"])):
            raise ConfigError(f"the cache {self.folder}: {MANIFEST} gives buckets to some clips or beyond the "
                              f"{len(data_params['buckets'])} of data.params.buckets: {REMAKE}")
        if buckets:
            source_of, local = self.order.slots()
            starts = np.asarray([source["start"] for source in sources], dtype=np.int64)
            self.bucket_of = np.asarray(buckets, dtype=np.int64)[starts[source_of] + local]
            self.groups = members_of_buckets(self.bucket_of, len(data_params["buckets"]))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        shard_number, key = self.clips[self.order[index]]
        with safe_open(str(self.folder / self.shards[shard_number]), framework="pt") as shard:
            metadata = shard.metadata()
            item = {"moments": shard.get_tensor(f"{key}.moments"),
                    "text_features": shard.get_tensor(f"{key}.text_features"),
                    "txt": metadata[f"{key}.caption"], "padded_frames": int(metadata[f"{key}.padded_frames"])}
            if self.first_frames:
                item["image"] = shard.get_tensor(f"{key}.first_frame").float()  # as a video dataset gives it
            return item


def trains_from_cache(config: DictConfig) -> bool:
    target = config.get("data", {}).get("target")
    return target is not None and get_obj_from_str(target) is CachedDataset


def check_caches(config: DictConfig, args) -> list[int] | None:
    """For a run whose data target is CachedDataset: checks that each cache of args.train_data and args.valid_data
    was made with the frozen parts of `config.model` (fingerprints of the weight files, nothing loaded) and returns
    the widths of their text features, per embedder; None for a run that reads videos. An image-to-video model needs
    caches with first frames."""
    if not trains_from_cache(config):
        return None
    frozen = frozen_parts_key(config.model, args.seed)
    widths = None
    for path in source_paths(args.train_data) + source_paths(args.valid_data):
        manifest = read_manifest(Path(path))
        check_key(Path(path), manifest["key"]["frozen"], frozen)
        if model_reads_images(config) and not manifest.get("first_frames"):
            raise ConfigError(f"the cache {path} holds no first frames (it was made for a text-to-video model), and "
                              f"model.noised_image_input needs them: {REMAKE} and this config")
        widths = widths or manifest["text_widths"]
    return widths
