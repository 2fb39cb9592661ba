"""Sample videos from a trained model, with the same configs as training.

    python sample_video.py --base configs/tiny/model.yaml configs/tiny/sample.yaml args.load=checkpoints/tiny
    python sample_video.py --base configs/cogvideox_5b.yaml configs/inference.yaml args.input_file=prompts.txt

Prompts come from `args.input_file` (one per line; `prompt@@image.png` for image-to-video) or, with
`args.input_type=cli`, from the terminal. Each prompt gives an mp4 (or, with `args.only_save_latents`, a
safetensors file of latents) in `args.output_dir` and a line in its `manifest.jsonl` (file, prompt, seed).
"""

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from satvideo import distributed
from satvideo.cli import parse_config, run_entrypoint
from satvideo.config import ConfigError, args_namespace
from satvideo.data.sft import resize_cover_center_crop
from satvideo.engine import VideoDiffusionEngine
from satvideo.sampling import interactive_prompts, read_prompts, save_video, slugify, write_manifest_line
from satvideo.checkpoint import load_network

VAE_SPATIAL = 8  # the CogVideoX VAE's spatial compression


def load_first_frame(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1], resized to cover (H, W) and centre-cropped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image for image-to-video not found: {path}")
    image = torch.from_numpy(iio.imread(path)[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, h, w]
    return resize_cover_center_crop(image[None], (height, width))[0]


def nearest_multiple_of_16(value: float) -> int:
    lower = int(value // 16) * 16
    return lower if abs(value - lower) < abs(value - (lower + 16)) else lower + 16


def size_from_image(image_height: int, image_width: int, short_side: int = 768) -> tuple[int, int]:
    """CogVideoX 1.5-I2V's output size, as the original derives it: the short side 768 px, the long side
    keeping the image's aspect ratio, to the nearest multiple of 16 (1920x1080 -> 768x1360)."""
    if image_height < image_width:
        return short_side, nearest_multiple_of_16(image_width / image_height * short_side)
    return nearest_multiple_of_16(image_height / image_width * short_side), short_side


def load_first_frame_at_its_aspect(path: str) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1] at size_from_image, resized without cropping (Lanczos, as the original)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image for image-to-video not found: {path}")
    image = Image.open(path).convert("RGB")
    height, width = size_from_image(image.height, image.width)
    resized = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 127.5 - 1


def latent_frame_count(args, network) -> int:
    """Latent frames to decode. For 1.5 models (temporal patch > 1) `args.sampling_num_frames` counts, as in the
    original, the latent frames sampled, including the first one that decoding drops (22 -> 81 frames)."""
    patch_t = network.patch_size[0] if not isinstance(network.patch_size, int) else 1
    if args.sampling_num_frames is None:
        return (network.num_frames - 1) // network.time_compressed_rate + 1
    if args.sampling_num_frames < 1:
        raise ConfigError(f"args.sampling_num_frames={args.sampling_num_frames}: give a positive number of latent frames")
    if patch_t == 1:
        return args.sampling_num_frames
    if args.sampling_num_frames % patch_t:
        raise ConfigError(f"args.sampling_num_frames={args.sampling_num_frames}: 1.5 models sample a multiple of "
                          f"{patch_t} latent frames (22 for 5 s, 42 for 10 s)")
    return args.sampling_num_frames - 1


def sampling_dtype(args) -> torch.dtype:
    if args.bf16 and args.fp16:
        raise ConfigError("args.bf16 and args.fp16 are both set: choose one")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def main() -> None:
    config = parse_config("Sample videos from a video diffusion transformer.")
    args = args_namespace(config)
    if not args.load:
        raise ConfigError("args.load: give the checkpoint to sample from (a run folder, iteration folder or file)")
    network = config.model.network_config.params
    latent_frames = latent_frame_count(args, network)
    height, width = args.sampling_image_size or (network.latent_height * VAE_SPATIAL, network.latent_width * VAE_SPATIAL)
    patch = network.patch_size if isinstance(network.patch_size, int) else network.patch_size[-1]
    if height % (VAE_SPATIAL * patch) or width % (VAE_SPATIAL * patch):
        raise ConfigError(f"args.sampling_image_size={[height, width]}: both must be multiples of {VAE_SPATIAL * patch}")
    # 1.5-I2V without an explicit size takes it from each image, as the original does
    size_follows_image = args.image2video and not isinstance(network.patch_size, int) and not args.sampling_image_size

    device = distributed.init_device(args.device)
    rank, world_size = distributed.rank(), distributed.world_size()
    if args.input_type == "txt":
        if not args.input_file:
            raise ConfigError("args.input_file: give a text file with one prompt per line (or args.input_type=cli)")
        prompts = list(enumerate(read_prompts(args.input_file)))[rank::world_size]  # ranks share the prompts
    elif world_size > 1:
        raise ConfigError("args.input_type=cli reads the terminal: run it in one process, not under torchrun")
    else:
        prompts = enumerate(interactive_prompts())

    engine = VideoDiffusionEngine.from_config(config.model, checkpoint_activations=False)  # no backward pass
    load_network(engine.network, args.load, strict=args.strict_load)
    engine.to(device, sampling_dtype(args)).eval()
    engine.place_frozen_parts(device, sampling_dtype(args))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, line in prompts:
        prompt, _, image_path = line.partition("@@")
        prompt = prompt.strip()
        first_frames = None
        if args.image2video:
            if not image_path:
                raise ConfigError(f"args.image2video: prompt {index} has no '@@image_path' part: {line!r}")
            if size_follows_image:
                image = load_first_frame_at_its_aspect(image_path.strip())
            else:
                image = load_first_frame(image_path.strip(), height, width)
            first_frames = image[None].expand(args.num_samples, -1, -1, -1)
        frame_height, frame_width = first_frames.shape[-2:] if first_frames is not None else (height, width)
        latent_shape = (latent_frames, args.latent_channels, frame_height // VAE_SPATIAL, frame_width // VAE_SPATIAL)
        seed = args.seed + index
        generator = torch.Generator().manual_seed(seed)  # on the CPU: a seed gives the same video on any device
        latents = engine.sample([prompt] * args.num_samples, latent_shape, generator, first_frames=first_frames)
        for sample in range(len(latents)):
            stem = f"{index:03d}_{sample}_{slugify(prompt)}"
            if args.only_save_latents:  # unscaled VAE latents [C, T', h, w], as the original's latent.pt
                name = f"{stem}.safetensors"
                unscaled = (latents[sample] / engine.scale_factor).permute(1, 0, 2, 3).contiguous().float().cpu()
                save_file({"latents": unscaled}, str(output_dir / name), metadata={"prompt": prompt, "seed": str(seed)})
            else:
                name = f"{stem}.mp4"
                video = engine.decode_first_stage(latents[sample : sample + 1], chunk_frames=args.decode_chunk_frames)
                save_video(video[0].cpu(), str(output_dir / name), fps=args.sampling_fps)
            write_manifest_line(str(output_dir), {"file": name, "prompt": prompt, "seed": seed})
            print(f"wrote {output_dir / name}", flush=True)


if __name__ == "__main__":
    run_entrypoint(main)
