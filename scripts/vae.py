r"""Run the 3D causal VAE alone: a video to its latents, latents back to a video.

    python scripts/vae.py encode VIDEO.mp4 OUT.safetensors --base configs/tiny/vae.yaml [key=value ...] \
        [--size H W] [--frames N] [--chunk-frames K] [--mean | --sample --seed S]
    python scripts/vae.py decode LATENTS.safetensors OUT.mp4 --base configs/tiny/vae.yaml [key=value ...] \
        [--chunk-frames 2] [--tile 32 --overlap 8] [--fps 8]

--base takes the YAML files of a model config, merged in order, then key=value overrides, as sample_video.py:
the VAE is `model.first_stage_config`. Its weights are `model.first_stage_config.params.ckpt_path` (a
`3d-vae.pt`: the official one, or the file `python -m satvideo.vae.train` writes; after `make demo` add
checkpoints/demo/vae/vae.yaml to --base); without it the VAE has random weights (seeded by --seed, a warning
says so). Nothing is downloaded. args.bf16 / args.fp16 run the VAE in that precision.

encode keeps the first N frames of the video (--frames, 4k+1; default the largest 4k+1 the video has; 8k+1
frames decode to as many frames, 4k+1 with odd k to 4k+4 as in the official model), resizes and centre-crops
them to --size (multiples of 8), and writes the safetensors tensor "latents" [C, T', H/8, W/8], float32 and
UNSCALED (the diffusion model takes them times model.scale_factor, recorded in the metadata) with metadata:
source, frames, size, fps, config, overrides, posterior, seed, scale_factor. decode reads "latents" (refused
before the VAE is built when a dimension is empty or a value is not finite) and writes an mp4 at --fps (1 to
1000; default: the metadata's fps when it is a number from 0.01 to 1000, else 8 with a warning). An existing
output is refused unless --overwrite; an output appears whole or not at all.
Each command ends with one line giving its time and peak memory (CUDA peak allocated; on the CPU, the peak
resident set of the process).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import decord
import torch
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from satvideo import distributed
from satvideo.atomic_files import replaced_atomically
from satvideo.cli import check_output_file, is_config_file, run_entrypoint
from satvideo.config import ARGS_RULES, ConfigError, args_namespace, check_value, instantiate_from_config, load_config
from satvideo.data.frames import largest_4k_plus_1
from satvideo.sampling.inputs import VAE_SPATIAL, load_clip, sampling_dtype
from satvideo.sampling.outputs import save_video
from satvideo.vae.autoencoder import LATENT_CHUNK_MULTIPLE, check_chunk_frames, check_tiling

LATENTS_KEY = "latents"
DEFAULT_FPS = 8
MIN_FPS, MAX_FPS = 0.01, 1000  # the writer gives ffmpeg the rate with two decimals
logger = logging.getLogger("vae")


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", nargs="+", required=True, metavar="YAML_OR_OVERRIDE",
                        help="model config YAMLs (model.first_stage_config, weights from its params.ckpt_path), "
                             "then key=value overrides")
    common.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    common.add_argument("--seed", type=int, help="seeds random weights and --sample (default: args.seed)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    common.add_argument("--debug", action="store_true", help="show the traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    # --base takes every value after it, so the positionals come first
    encode = commands.add_parser("encode", parents=[common], help="video -> unscaled latents (safetensors)",
                                 usage="%(prog)s VIDEO OUT --base YAML_OR_OVERRIDE [...] [options]")
    encode.add_argument("video", help="input video (mp4 or anything decord reads)")
    encode.add_argument("out", help="safetensors file to write")
    encode.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="resize to cover H x W and centre-crop (default: the video's size)")
    encode.add_argument("--frames", type=int, help="frames to keep from the start, 4k+1 (default: the most)")
    encode.add_argument("--chunk-frames", type=int,
                        help="encode this many frames at a time, a multiple of 4 (default: model.encode_chunk_frames, "
                             "else all at once)")
    posterior = encode.add_mutually_exclusive_group()
    posterior.add_argument("--mean", dest="sample", action="store_false", help="the posterior mean (default)")
    posterior.add_argument("--sample", dest="sample", action="store_true", help="a posterior draw (--seed)")
    encode.set_defaults(sample=False)

    decode = commands.add_parser("decode", parents=[common], help="latents (safetensors) -> mp4",
                                 usage="%(prog)s LATENTS OUT.mp4 --base YAML_OR_OVERRIDE [...] [options]")
    decode.add_argument("latents", help=f"safetensors file with a tensor {LATENTS_KEY!r} [C, T', h, w], unscaled")
    decode.add_argument("out", help="mp4 file to write")
    decode.add_argument("--chunk-frames", type=int, default=2, help="latent frames per decoding step, even (2)")
    decode.add_argument("--tile", type=int, help="decode tiles of this many latent pixels square (e.g. 32)")
    decode.add_argument("--overlap", type=int, default=8, help="latent pixels shared by neighbouring tiles (8)")
    decode.add_argument("--fps", type=int, help=f"1 to {MAX_FPS}; default: the fps in the latents' metadata when it "
                                                f"is a number from {MIN_FPS} to {MAX_FPS}, else {DEFAULT_FPS}")
    return parser.parse_args()


def load_vae_config(base: list[str]) -> tuple[DictConfig, list[str], list[str]]:
    """(merged config, its files, its overrides); the config must hold model.first_stage_config."""
    files = [item for item in base if is_config_file(item)]
    overrides = [item for item in base if not is_config_file(item)]
    config = load_config(files, overrides)
    if "model" not in config or "first_stage_config" not in config.model:
        raise ConfigError(f"no model.first_stage_config in {' '.join(files)} (give the VAE's config, "
                          "e.g. configs/tiny/vae.yaml)")
    return config, files, overrides


def pick_device(choice: str | None) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return torch.device("cuda" if distributed.use_gpu(choice) else "cpu")


def build_vae(config: DictConfig, device: torch.device, seed: int) -> torch.nn.Module:
    """The VAE of model.first_stage_config, in eval mode on `device` in the precision of args.bf16 / args.fp16."""
    section = config.model.first_stage_config
    if not (section.get("params") or {}).get("ckpt_path"):
        logger.warning("model.first_stage_config.params.ckpt_path is not set: the VAE has random weights (seed %d)",
                       seed)
    torch.manual_seed(seed)
    vae = instantiate_from_config(section)
    return vae.eval().requires_grad_(False).to(device, sampling_dtype(args_namespace(config)))


def open_video(path: str) -> decord.VideoReader:
    if not Path(path).is_file():
        raise ConfigError(f"video {path} not found")
    try:
        return decord.VideoReader(path)
    except (RuntimeError, decord.DECORDError) as error:
        raise ConfigError(f"video {path} cannot be decoded ({error})") from error


def frames_to_keep(path: str, available: int, requested: int | None) -> int:
    """--frames, checked against the video; by default the largest 4k+1 it holds."""
    if requested is None:
        if available < 1:
            raise ConfigError(f"video {path} holds no frame")
        return largest_4k_plus_1(available)
    if requested < 1 or requested % 4 != 1:
        raise ConfigError(f"--frames {requested}: the causal VAE takes 4k+1 frames (1, 5, 9, 13, 17, ...)")
    if requested > available:
        raise ConfigError(f"--frames {requested}: video {path} has only {available} frames")
    return requested


def target_size(path: str, reader: decord.VideoReader, requested: list[int] | None) -> tuple[int, int]:
    """--size, or the video's own size; both sides must be multiples of the VAE's spatial compression."""
    height, width = requested or reader[0].shape[:2]
    if height <= 0 or width <= 0 or height % VAE_SPATIAL or width % VAE_SPATIAL:
        where = "--size" if requested else f"video {path} (use --size)"
        raise ConfigError(f"{where}: {height}x{width} is not a multiple of {VAE_SPATIAL} on both sides")
    return height, width


def encode(options: argparse.Namespace, config: DictConfig, files: list[str], overrides: list[str],
           device: torch.device, seed: int) -> str:
    """Write the latents of the video; returns the summary of what was done."""
    check_output_file(options.out, "output", options.overwrite, make_folders=True)  # the positional `out`
    if Path(options.out).resolve() == Path(options.video).resolve():
        raise ConfigError(f"output {options.out} is the input video; give another path")
    reader = open_video(options.video)
    num_frames = frames_to_keep(options.video, len(reader), options.frames)
    height, width = target_size(options.video, reader, options.size)
    fps = reader.get_avg_fps()
    vae = build_vae(config, device, seed)
    if options.chunk_frames is not None:
        chunk_frames, name = options.chunk_frames, "--chunk-frames"
    else:
        chunk_frames, name = config.model.get("encode_chunk_frames"), "model.encode_chunk_frames"
    if chunk_frames is not None:
        check_chunk_frames(chunk_frames, vae.encoder.temporal_compress_times, name)
    clip = load_clip(options.video, num_frames, height, width)  # [T, 3, H, W] in [-1, 1]
    video = clip.permute(1, 0, 2, 3)[None].to(device, next(vae.parameters()).dtype)  # [1, 3, T, H, W]
    torch.manual_seed(seed)
    with torch.no_grad():
        latents = vae.encode(video, sample=options.sample, chunk_frames=chunk_frames)[0].float().cpu()
    metadata = {
        "source": str(options.video), "frames": str(num_frames), "size": json.dumps([height, width]),
        "fps": f"{fps:g}", "config": json.dumps(files), "overrides": json.dumps(overrides),
        "posterior": "sample" if options.sample else "mean", "seed": str(seed),
        "scale_factor": str(config.model.get("scale_factor", 1.0)),
    }
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(options.out) as partial:
        save_file({LATENTS_KEY: latents.contiguous()}, str(partial), metadata=metadata)
    return (f"encoded {options.video} ({num_frames} frames, {height}x{width}) -> {options.out}: unscaled latents "
            f"{list(latents.shape)}")


def read_latents(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    """(latents [C, T', h, w], metadata) of a file written by encode (or by sampling with only_save_latents)."""
    if not Path(path).is_file():
        raise ConfigError(f"latents file {path} not found")
    try:
        with safe_open(path, framework="pt") as file:
            if LATENTS_KEY not in file.keys():
                raise ConfigError(f"{path} has no tensor {LATENTS_KEY!r} (it holds {', '.join(file.keys()) or 'none'})")
            return file.get_tensor(LATENTS_KEY), file.metadata() or {}
    except SafetensorError as error:
        raise ConfigError(f"{path} is not a readable safetensors file ({error})") from error


def check_latents(path: str, latents: torch.Tensor) -> None:
    """Latents the VAE can decode, whatever its weights: [C, T', h, w] with no empty dimension, every value finite."""
    if latents.ndim != 4 or 0 in latents.shape:
        raise ConfigError(f"{path}: tensor {LATENTS_KEY!r} has shape {list(latents.shape)}; expected [C, T', h, w] "
                          "with every dimension > 0")
    nonfinite = int((~torch.isfinite(latents)).sum())
    if nonfinite:
        raise ConfigError(f"{path}: tensor {LATENTS_KEY!r} holds {nonfinite} non-finite values (NaN or inf)")


def check_channels(path: str, latents: torch.Tensor, channels: int) -> None:
    if latents.shape[0] != channels:
        raise ConfigError(f"{path}: tensor {LATENTS_KEY!r} has shape {list(latents.shape)}; expected "
                          f"[C, T', h, w] with C = {channels} (the VAE's z_channels)")


def output_fps(path: str, requested: int | None, metadata: dict[str, str]) -> float:
    """--fps, else the fps recorded in the latents' metadata when it lies in [MIN_FPS, MAX_FPS], else DEFAULT_FPS."""
    if requested is not None:
        if not 1 <= requested <= MAX_FPS:
            raise ConfigError(f"--fps {requested}: expected a whole number from 1 to {MAX_FPS}")
        return requested
    recorded = metadata.get("fps")
    try:
        fps = float(recorded)
    except (TypeError, ValueError):
        fps = math.nan
    if MIN_FPS <= fps <= MAX_FPS:
        return fps
    found = "has no fps" if recorded is None else f"fps {recorded!r} is not a number from {MIN_FPS} to {MAX_FPS}"
    logger.warning("%s: its metadata %s; writing at %d fps (--fps sets it)", path, found, DEFAULT_FPS)
    return DEFAULT_FPS


def decode(options: argparse.Namespace, config: DictConfig, device: torch.device, seed: int) -> str:
    """Write the video of the latents; returns the summary of what was done."""
    check_output_file(options.out, "output", options.overwrite, make_folders=True)  # the positional `out`
    if Path(options.out).suffix.lower() != ".mp4":  # ffmpeg picks the container by the name
        raise ConfigError(f"output {options.out}: decode writes an mp4; give a path ending in .mp4")
    latents, metadata = read_latents(options.latents)
    check_chunk_frames(options.chunk_frames, LATENT_CHUNK_MULTIPLE, "--chunk-frames")
    if options.tile is not None:
        check_tiling(options.tile, options.overlap, ("--tile", "--overlap"))
    check_latents(options.latents, latents)
    fps = output_fps(options.latents, options.fps, metadata)
    vae = build_vae(config, device, seed)
    check_channels(options.latents, latents, vae.decoder.conv_in.conv.in_channels)
    z = latents[None].to(device, next(vae.parameters()).dtype)  # [1, C, T', h, w]
    with torch.no_grad():
        if options.tile:
            video = vae.decode_tiled(z, options.chunk_frames, options.tile, options.overlap)
        else:
            video = vae.decode(z, chunk_frames=options.chunk_frames)
    frames = video[0].permute(1, 0, 2, 3)  # [T, 3, H, W]
    save_video(frames, options.out, fps)
    tiling = f", tiles of {options.tile} overlapping by {options.overlap}" if options.tile else ""
    return (f"decoded {options.latents} {list(latents.shape)} -> {options.out}: {frames.shape[0]} frames, "
            f"{frames.shape[2]}x{frames.shape[3]} at {fps:g} fps{tiling}")


def main() -> None:
    options = parse_options()
    start = time.perf_counter()
    config, files, overrides = load_vae_config(options.base)
    device = pick_device(options.device)
    if options.seed is not None:
        check_value("--seed", options.seed, ARGS_RULES["seed"])
    seed = config.args.seed if options.seed is None else options.seed
    if options.command == "encode":
        summary = encode(options, config, files, overrides, device, seed)
    else:
        summary = decode(options, config, device, seed)
    memory = "CUDA peak allocated" if device.type == "cuda" else "peak resident set"
    print(f"{summary} in {time.perf_counter() - start:.1f} s ({memory} {distributed.peak_memory_gb(device):.2f} GB)",
          flush=True)


if __name__ == "__main__":
    run_entrypoint(main)
