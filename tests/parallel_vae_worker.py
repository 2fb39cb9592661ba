"""Run under torchrun: the tiny VAE's decode and encode with the time axis over all ranks, against the same VAE's
chunked decode and encode on one rank with the same chunk boundaries. Writes to argv[1] (rank 0)
{case: {"max_abs", "max_rel", "chunk_frames", "chunks"}} (differences maximised over the ranks) and
{"errors": {case: message}} for inputs too short for the ranks."""

import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from satvideo.config import instantiate_from_config, load_config
from satvideo.parallel.context_vae import (decode_context_parallel, default_chunk_frames,
                                           encode_context_parallel)
from satvideo.vae.autoencoder import LATENT_CHUNK_MULTIPLE
from satvideo.vae.causal_conv import time_chunks

ROOT = Path(__file__).resolve().parents[1]
DRAW_SEED = 3
# per rank count: 2P + 1 latent frames (one round by default), 3P + 1 (a partial second round), 4P + 1 (2 ranks)
LATENT_FRAMES = {2: (5, 7, 9), 4: (9, 13)}


def difference(got: torch.Tensor, one_rank: Callable[[], torch.Tensor], chunk_frames: int, frames: int) -> dict:
    """Max abs and relative difference to the one-rank result (computed on rank 0 only), the largest over ranks."""
    expected = one_rank() if dist.get_rank() == 0 else torch.empty_like(got)
    dist.broadcast(expected, 0)
    errors = torch.tensor([(got - expected).abs().max(), 0.0])
    errors[1] = errors[0] / expected.abs().max()
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return {"max_abs": float(errors[0]), "max_rel": float(errors[1]), "chunk_frames": chunk_frames,
            "chunks": len(time_chunks(frames, chunk_frames))}


def decode_cases(vae, ranks: int) -> dict:
    results = {}
    for latent_frames in LATENT_FRAMES[ranks]:
        z = torch.randn(1, 16, latent_frames, 4, 6, generator=torch.Generator().manual_seed(latent_frames))
        default = default_chunk_frames(latent_frames, LATENT_CHUNK_MULTIPLE, ranks)
        for name, chunk_frames in (("default", None), ("chunk_frames=2", 2)):
            used = default if chunk_frames is None else chunk_frames
            got = decode_context_parallel(vae, z, None, chunk_frames=chunk_frames)
            results[f"decode T'={latent_frames} {name}"] = difference(
                got, lambda: vae.decode(z, chunk_frames=used), used, latent_frames)
    return results


def one_rank_draw(vae, x: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    torch.manual_seed(DRAW_SEED)
    return vae.encode(x, sample=True, chunk_frames=chunk_frames)


def encode_cases(vae, ranks: int) -> dict:
    x = torch.rand(1, 3, 17, 32, 48, generator=torch.Generator().manual_seed(17)) * 2 - 1
    default = default_chunk_frames(17, vae.encoder.temporal_compress_times, ranks)
    results = {}
    for name, chunk_frames in (("default", None), ("chunk_frames=4", 4)):
        used = default if chunk_frames is None else chunk_frames
        got = encode_context_parallel(vae, x, None, sample=False, chunk_frames=chunk_frames)
        results[f"encode mean {name}"] = difference(
            got, lambda: vae.encode(x, sample=False, chunk_frames=used), used, 17)
    torch.manual_seed(DRAW_SEED if dist.get_rank() == 0 else 100 + dist.get_rank())  # all must get rank 0's draw
    got = encode_context_parallel(vae, x, None, sample=True)
    results["encode draw default"] = difference(got, lambda: one_rank_draw(vae, x, default), default, 17)
    return results


def error_cases(vae, ranks: int) -> dict:
    errors = {}
    for name, call in (
        ("decode too short", lambda: decode_context_parallel(vae, torch.zeros(1, 16, 2 * ranks - 1, 4, 6), None)),
        ("decode too few chunks", lambda: decode_context_parallel(vae, torch.zeros(1, 16, 9, 4, 6), None,
                                                                  chunk_frames=8)),
        ("encode too short", lambda: encode_context_parallel(vae, torch.zeros(1, 3, 4 * ranks - 1, 32, 48), None)),
    ):
        try:
            call()
        except ValueError as error:
            errors[name] = str(error)
    return errors


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config([ROOT / "configs/tiny/vae.yaml"])
    vae = instantiate_from_config(config.model.first_stage_config).eval()
    ranks = dist.get_world_size()
    with torch.no_grad():
        results = {**decode_cases(vae, ranks), **encode_cases(vae, ranks), "errors": error_cases(vae, ranks)}
    if dist.get_rank() == 0:
        Path(sys.argv[1], "results.json").write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
