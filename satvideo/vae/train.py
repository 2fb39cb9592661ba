"""Train a small VAE to reconstruct the clips of an SFT-layout dataset, on the CPU (used by `make demo`).

    python -m satvideo.vae.train --data DIR --out FILE.pt --iters 800 --size 32 --frames 9

Loss: MSE + kl_weight * KL, Adam. The whole dataset is decoded into memory once (the demo dataset
is small). Saves `{"state_dict": ...}` with the keys of the official `3d-vae.pt`; `--overlay` also
writes a YAML that points `model.first_stage_config.params.ckpt_path` at it and sets `model.scale_factor`,
to merge after the model config.
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from satvideo.config import instantiate_from_config
from satvideo.data import SFTDataset
from satvideo.vae.autoencoder import VideoAutoencoder


def load_clips(data_dir: str, size: int, frames: int, fps: int) -> Tensor:
    """Every clip of the dataset as one tensor [N, 3, T, H, W] in [-1, 1]."""
    dataset = SFTDataset(data_dir, video_size=[size, size], fps=fps, max_num_frames=frames, skip_frms_num=0)
    clips = torch.stack([dataset[i]["mp4"] for i in range(len(dataset))])  # [N, T, 3, H, W]
    return clips.permute(0, 2, 1, 3, 4).contiguous()


def train_vae(model: VideoAutoencoder, clips: Tensor, iters: int, batch_size: int = 4, lr: float = 1e-3,
              kl_weight: float = 1e-6, log_every: int = 50) -> list[float]:
    """Fit `model` to random batches of `clips` [N, 3, T, H, W]; returns the MSE of every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    mse_history = []
    for step in range(1, iters + 1):
        batch = clips[torch.randint(len(clips), (batch_size,))]
        reconstruction, _, log = model(batch)
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + kl_weight * log["kl"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mse_history.append(mse.item())
        if step % log_every == 0 or step == iters:
            print(f"step {step:5d}  mse {mse.item():.5f}  kl {log['kl'].item():.1f}", flush=True)
    return mse_history


@torch.no_grad()
def reconstruction_mse(model: VideoAutoencoder, clips: Tensor, batch_size: int = 8) -> float:
    """MSE over all clips through the sampling path: posterior mean, chunked decode."""
    model.eval()
    squared_error = sum(F.mse_loss(model.decode(model.encode(batch, sample=False)), batch, reduction="sum")
                        for batch in clips.split(batch_size))
    return (squared_error / clips.numel()).item()


def build_model(config_path: str) -> VideoAutoencoder:
    """The VAE of `model.first_stage_config` in a YAML file."""
    config = OmegaConf.load(config_path)
    return instantiate_from_config(config.model.first_stage_config)


@torch.no_grad()
def latent_scale_factor(model: VideoAutoencoder, clips: Tensor, batch_size: int = 8) -> float:
    """1 / std of the posterior means: the factor that gives the diffusion model unit-variance latents
    (the role of 1.15258426 and 0.7 for the official VAEs)."""
    model.eval()
    latents = torch.cat([model.encode(batch, sample=False) for batch in clips.split(batch_size)])
    return 1.0 / latents.std().item()


def write_ckpt_overlay(overlay_path: str, ckpt_path: str, scale_factor: float) -> None:
    """A config fragment that makes the model config load the trained VAE and scale its latents."""
    overlay = {"model": {"scale_factor": scale_factor,
                         "first_stage_config": {"params": {"ckpt_path": str(Path(ckpt_path).resolve())}}}}
    Path(overlay_path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(overlay), overlay_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder with videos/ and labels/")
    parser.add_argument("--out", required=True, help="where to write the checkpoint (.pt)")
    parser.add_argument("--config", default="configs/tiny/vae.yaml", help="YAML with model.first_stage_config")
    parser.add_argument("--overlay", help="also write a YAML setting model.first_stage_config.params.ckpt_path and model.scale_factor")
    parser.add_argument("--iters", type=int, default=800, help="about 800 for colours to survive on the toy data")
    parser.add_argument("--size", type=int, default=32, help="frame height and width")
    parser.add_argument("--frames", type=int, default=9, help="frames per clip (4k+1)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    clips = load_clips(args.data, args.size, args.frames, args.fps)
    model = build_model(args.config)
    print(f"{len(clips)} clips of {args.frames} frames at {args.size}x{args.size}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    start = time.perf_counter()
    train_vae(model, clips, args.iters, args.batch_size, args.lr, args.kl_weight, args.log_every)
    elapsed = time.perf_counter() - start
    print(f"trained {args.iters} steps in {elapsed:.0f} s; reconstruction MSE {reconstruction_mse(model, clips):.5f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, args.out)
    print(f"saved {args.out}")
    if args.overlay:
        scale_factor = latent_scale_factor(model, clips)
        write_ckpt_overlay(args.overlay, args.out, scale_factor)
        print(f"wrote {args.overlay} (latent scale factor {scale_factor:.4f})")


if __name__ == "__main__":
    main()
