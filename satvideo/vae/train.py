"""Train a small VAE to reconstruct the clips of an SFT-layout dataset, on the CPU (used by `make demo`).

    python -m satvideo.vae.train --data DIR --out FILE.pt --iters 800 --size 32 --frames 9

Loss: MSE + kl_weight * KL, Adam. The whole dataset is decoded into memory once (the demo dataset
is small). Saves `{"state_dict": ...}` with the keys of the official `3d-vae.pt`; `--overlay` also
writes a YAML that points `model.first_stage_config.params.ckpt_path` at it and sets `model.scale_factor`,
to merge after the model config.

Every flag, the config and the output paths are checked before any data is decoded; errors are one line (the
traceback with --debug). A loss that stops being finite, or weights or a latent scale factor that are not finite
after training, end the run with an error and nothing is saved. An existing --out or --overlay is refused unless
--overwrite. Each file appears whole or not at all, and the pair is replaced in this order: the old overlay
removed, the checkpoint replaced, the new overlay written. An overlay therefore always belongs to the checkpoint
beside it: a run killed while saving leaves the earlier pair, or a checkpoint (earlier or new) without an overlay,
never new weights with an earlier scale_factor. An overlay not given as --overlay is left as it is, even one that
points at the replaced --out.
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from satvideo.atomic_files import replaced_atomically, write_text_atomically
from satvideo.checkpoint import non_finite
from satvideo.cli import check_output_file, run_entrypoint
from satvideo.config import (ARGS_RULES, ConfigError, Rule, TrainingError, check_value, instantiate_from_config,
                             is_whole_number, load_config, number_rule, whole_rule)
from satvideo.data import SFTDataset
from satvideo.data.health import BadSample
from satvideo.data.sft import find_videos
from satvideo.vae.autoencoder import VideoAutoencoder

def training_frames_rule(temporal_compression: int) -> Rule:
    """Frame counts whose reconstruction has as many frames: with t-fold temporal compression (t > 1), tk+1 frames
    with odd k make an even number of latent frames, which the decoder expands to tk+t, as the official VAE does."""
    if temporal_compression == 1:
        return whole_rule(1)
    step = 2 * temporal_compression
    return (lambda value: is_whole_number(value) and value >= 1 and value % step == 1,
            f"{step}k+1 frames (1, {step + 1}, {2 * step + 1}, ...): with {temporal_compression}x temporal compression "
            f"the VAE decodes {temporal_compression}k+1 frames with odd k to {temporal_compression}k+"
            f"{temporal_compression}")


def finite(rule: Rule) -> Rule:
    """`rule` refusing inf as well (NaN fails its comparisons already)."""
    test, expected = rule
    return (lambda value: test(value) and math.isfinite(value)), expected.replace("a number", "a finite number", 1)


def load_clips(data_dir: str, size: int, frames: int, fps: int) -> Tensor:
    """Every usable clip of the dataset, once each, as one tensor [N, 3, T, H, W] in [-1, 1]; bad ones are left out
    (loaded as themselves, not through the stand-ins a training dataset hands out)."""
    dataset = SFTDataset(data_dir, video_size=[size, size], fps=fps, max_num_frames=frames, skip_frms_num=0)
    clips = []
    for index in range(len(dataset)):
        try:
            clips.append(dataset.load(index)["mp4"])  # [T, 3, H, W]
        except BadSample:
            continue
    if not clips:
        raise ConfigError(f"--data {data_dir}: no clip can be used; scripts/check_dataset.py lists the files")
    return torch.stack(clips).permute(0, 2, 1, 3, 4).contiguous()


def train_vae(model: VideoAutoencoder, clips: Tensor, iters: int, batch_size: int = 4, lr: float = 1e-3,
              kl_weight: float = 1e-6, log_every: int = 50) -> list[float]:
    """Fit `model` to random batches of `clips` [N, 3, T, H, W]; returns the MSE of every step. TrainingError when
    the loss is not finite (before that step changes the weights)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    mse_history = []
    for step in range(1, iters + 1):
        batch = clips[torch.randint(len(clips), (batch_size,))]
        reconstruction, _, log = model(batch)
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + kl_weight * log["kl"]
        if not torch.isfinite(loss):
            raise TrainingError(f"step {step}: the loss is {loss.item()} (mse {mse.item()}, kl {log['kl'].item()}); "
                                "nothing saved (try a lower --lr or --kl-weight)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mse_history.append(mse.item())
        if step % log_every == 0 or step == iters:
            print(f"step {step:5d}  mse {mse.item():.5f}  kl {log['kl'].item():.1f}", flush=True)
    return mse_history


def check_finite_weights(model: VideoAutoencoder) -> None:
    """The last step may break the weights without any loss showing it."""
    broken = non_finite(model.state_dict())
    if broken:
        raise TrainingError(f"{len(broken)} weight tensors are not finite after training (the first: {broken[0]}); "
                            "nothing saved (try a lower --lr or --kl-weight)")


@torch.no_grad()
def reconstruction_mse(model: VideoAutoencoder, clips: Tensor, batch_size: int = 8) -> float:
    """MSE over all clips through the sampling path: posterior mean, chunked decode."""
    model.eval()
    squared_error = sum(F.mse_loss(model.decode(model.encode(batch, sample=False)), batch, reduction="sum")
                        for batch in clips.split(batch_size))
    return (squared_error / clips.numel()).item()


def read_vae_config(config_path: str) -> DictConfig:
    """`model.first_stage_config` of the YAML file; its weights, when it names some, must exist."""
    try:
        config = load_config([config_path])
    except ConfigError as error:
        raise ConfigError(f"--config: {error}") from error
    section = OmegaConf.select(config, "model.first_stage_config")
    if not isinstance(section, DictConfig):
        raise ConfigError(f"--config {config_path}: no model.first_stage_config (give the VAE's config, e.g. "
                          "configs/tiny/vae.yaml)")
    ckpt_path = OmegaConf.select(section, "params.ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(f"--config {config_path}: model.first_stage_config.params.ckpt_path {ckpt_path} not found")
    return section


def spatial_compression(section: DictConfig, config_path: str) -> int:
    """Every encoder level but the last halves height and width."""
    ch_mult = OmegaConf.select(section, "params.encoder_config.params.ch_mult")
    check_value(f"--config {config_path}: model.first_stage_config.params.encoder_config.params.ch_mult", ch_mult,
                (lambda value: isinstance(value, ListConfig) and len(value) > 0, "a list of channel multipliers"))
    return 2 ** (len(ch_mult) - 1)


def temporal_compression(section: DictConfig, config_path: str) -> int:
    """The encoder's `temporal_compress_times` (4 when the config leaves it out, as the encoder does)."""
    times = OmegaConf.select(section, "params.encoder_config.params.temporal_compress_times", default=4)
    check_value(f"--config {config_path}: model.first_stage_config.params.encoder_config.params."
                "temporal_compress_times", times,
                (lambda value: is_whole_number(value) and value >= 1 and value & (value - 1) == 0, "a power of 2"))
    return times


def check_data(data_dir: str) -> None:
    """A dataset folder with videos/*.mp4 (the videos themselves are read by SFTDataset)."""
    if not Path(data_dir).is_dir():
        raise ConfigError(f"--data {data_dir}: no such folder")
    try:
        find_videos(Path(data_dir))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data {data_dir}: {error}") from error


def check_outputs(out: str, overlay: str | None, overwrite: bool) -> None:
    """--out and --overlay: two distinct files that may be written."""
    check_output_file(out, "--out", overwrite, make_folders=True)
    if overlay is not None:
        check_output_file(overlay, "--overlay", overwrite, make_folders=True)
        if Path(overlay).resolve() == Path(out).resolve():
            raise ConfigError(f"--overlay {overlay} is --out too; the checkpoint and the YAML need a file each")


@torch.no_grad()
def latent_scale_factor(model: VideoAutoencoder, clips: Tensor, batch_size: int = 8) -> float:
    """1 / std of the posterior means: the factor that gives the diffusion model unit-variance latents
    (the role of 1.15258426 and 0.7 for the official VAEs). TrainingError when it is not finite."""
    model.eval()
    latents = torch.cat([model.encode(batch, sample=False) for batch in clips.split(batch_size)])
    std = latents.std().item()
    scale_factor = 1.0 / std if std > 0 else math.inf
    if not math.isfinite(scale_factor):
        raise TrainingError(f"the posterior means have standard deviation {std}: no finite latent scale factor; "
                            "nothing saved")
    return scale_factor


def write_ckpt_overlay(overlay_path: str, ckpt_path: str, scale_factor: float) -> None:
    """A config fragment that makes the model config load the trained VAE and scale its latents."""
    overlay = {"model": {"scale_factor": scale_factor,
                         "first_stage_config": {"params": {"ckpt_path": str(Path(ckpt_path).resolve())}}}}
    Path(overlay_path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(overlay_path, OmegaConf.to_yaml(OmegaConf.create(overlay)))


def save_outputs(model: VideoAutoencoder, out: str, overlay: str | None, scale_factor: float | None) -> None:
    """The checkpoint, then its overlay, in the order the module docstring gives."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out) as partial:
        torch.save({"state_dict": model.state_dict()}, partial)
        if overlay is not None:
            Path(overlay).unlink(missing_ok=True)
    if overlay is not None:
        write_ckpt_overlay(overlay, out, scale_factor)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder with videos/ and labels/")
    parser.add_argument("--out", required=True, help="where to write the checkpoint (.pt)")
    parser.add_argument("--config", default="configs/tiny/vae.yaml", help="YAML with model.first_stage_config")
    parser.add_argument("--overlay", help="also write a YAML setting model.first_stage_config.params.ckpt_path and "
                                          "model.scale_factor")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and --overlay")
    parser.add_argument("--iters", type=int, default=800, help="about 800 for colours to survive on the toy data")
    parser.add_argument("--size", type=int, default=32, help="frame height and width, a multiple of the VAE's "
                                                              "spatial compression (8 for 4 encoder levels)")
    parser.add_argument("--frames", type=int, default=9,
                        help="frames per clip: 2tk+1 for a VAE of t-fold temporal compression (8k+1 for the usual 4x)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for flag, value, rule in (("--iters", args.iters, whole_rule(1)),
                              ("--fps", args.fps, number_rule(0, exclusive=True)),
                              ("--batch-size", args.batch_size, whole_rule(1)),
                              ("--lr", args.lr, finite(number_rule(0, exclusive=True))),
                              ("--kl-weight", args.kl_weight, finite(number_rule(0))),
                              ("--seed", args.seed, ARGS_RULES["seed"]),
                              ("--log-every", args.log_every, whole_rule(1))):
        check_value(flag, value, rule)
    section = read_vae_config(args.config)
    compression = spatial_compression(section, args.config)
    check_value("--size", args.size, (lambda value: is_whole_number(value) and value > 0 and value % compression == 0,
                                      f"a multiple of {compression} > 0 (the spatial compression of the VAE in "
                                      f"--config {args.config})"))
    check_value("--frames", args.frames, training_frames_rule(temporal_compression(section, args.config)))
    check_data(args.data)
    check_outputs(args.out, args.overlay, args.overwrite)

    torch.manual_seed(args.seed)
    clips = load_clips(args.data, args.size, args.frames, args.fps)
    model = instantiate_from_config(section)
    print(f"{len(clips)} clips of {args.frames} frames at {args.size}x{args.size}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    start = time.perf_counter()
    train_vae(model, clips, args.iters, args.batch_size, args.lr, args.kl_weight, args.log_every)
    elapsed = time.perf_counter() - start
    check_finite_weights(model)
    print(f"trained {args.iters} steps in {elapsed:.0f} s; reconstruction MSE {reconstruction_mse(model, clips):.5f}")
    scale_factor = latent_scale_factor(model, clips) if args.overlay is not None else None
    check_outputs(args.out, args.overlay, args.overwrite)  # a file that appeared during training is refused too
    save_outputs(model, args.out, args.overlay, scale_factor)
    print(f"saved {args.out}")
    if args.overlay is not None:
        print(f"wrote {args.overlay} (latent scale factor {scale_factor:.4f})")


if __name__ == "__main__":
    run_entrypoint(main)
