"""Sample videos from a trained model, with the same configs as training.

    python sample_video.py --base configs/tiny/model.yaml configs/tiny/sample.yaml args.load=checkpoints/tiny
    python sample_video.py --base configs/cogvideox_5b.yaml configs/inference.yaml args.input_file=prompts.txt

Prompts come from `args.input_file` (one per line; `prompt@@image.png` for image-to-video) or, with
`args.input_type=cli`, from the terminal. Each prompt gives an mp4 in `args.output_dir` and a line in its
`manifest.jsonl` (file, prompt, seed).
"""

import logging
from pathlib import Path

import imageio.v3 as iio
import torch

from satvideo import distributed
from satvideo.cli import parse_config
from satvideo.config import ConfigError, args_namespace
from satvideo.data.sft import resize_cover_center_crop
from satvideo.engine import VideoDiffusionEngine
from satvideo.sampling import interactive_prompts, read_prompts, save_video, slugify, write_manifest_line
from satvideo.training.checkpoint import load_network

VAE_SPATIAL = 8  # the CogVideoX VAE's spatial compression


def load_first_frame(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1], resized to cover (H, W) and centre-cropped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image for image-to-video not found: {path}")
    image = torch.from_numpy(iio.imread(path)[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, h, w]
    return resize_cover_center_crop(image[None], (height, width))[0]


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
    latent_frames = args.sampling_num_frames or (network.num_frames - 1) // network.time_compressed_rate + 1
    height, width = args.sampling_image_size or (network.latent_height * VAE_SPATIAL, network.latent_width * VAE_SPATIAL)
    patch = network.patch_size if isinstance(network.patch_size, int) else network.patch_size[-1]
    if height % (VAE_SPATIAL * patch) or width % (VAE_SPATIAL * patch):
        raise ConfigError(f"args.sampling_image_size={[height, width]}: both must be multiples of {VAE_SPATIAL * patch}")
    latent_shape = (latent_frames, args.latent_channels, height // VAE_SPATIAL, width // VAE_SPATIAL)

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

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, line in prompts:
        prompt, _, image_path = line.partition("@@")
        prompt = prompt.strip()
        first_frames = None
        if args.image2video:
            if not image_path:
                raise ConfigError(f"args.image2video: prompt {index} has no '@@image_path' part: {line!r}")
            first_frames = load_first_frame(image_path.strip(), height, width)[None].expand(args.num_samples, -1, -1, -1)
        seed = args.seed + index
        generator = torch.Generator(device).manual_seed(seed)
        latents = engine.sample([prompt] * args.num_samples, latent_shape, generator, first_frames=first_frames)
        videos = engine.decode_first_stage(latents, chunk_frames=args.decode_chunk_frames)
        for sample, video in enumerate(videos):
            name = f"{index:03d}_{sample}_{slugify(prompt)}.mp4"
            save_video(video.cpu(), str(output_dir / name), fps=args.sampling_fps)
            write_manifest_line(str(output_dir), {"file": name, "prompt": prompt, "seed": seed})
            print(f"wrote {output_dir / name}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
