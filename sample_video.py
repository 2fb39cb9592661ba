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
import torch.nn.functional as F

from satvideo import distributed
from satvideo.cli import parse_config
from satvideo.config import ConfigError, args_namespace
from satvideo.engine import VideoDiffusionEngine
from satvideo.sampling import interactive_prompts, read_prompts, save_video, slugify, write_manifest_line
from satvideo.training.checkpoint import load_network

DTYPES = {(False, False): torch.float32, (True, False): torch.bfloat16, (False, True): torch.float16}
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def load_first_frame(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1], resized to cover (H, W) and centre-cropped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image for image-to-video not found: {path}")
    image = torch.from_numpy(iio.imread(path)[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, h, w]
    scale = max(height / image.shape[1], width / image.shape[2])
    size = (max(height, round(image.shape[1] * scale)), max(width, round(image.shape[2] * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[:, top:top + height, left:left + width]


def main() -> None:
    config = parse_config("Sample videos from a video diffusion transformer.")
    args = args_namespace(config)
    distributed.init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    engine = VideoDiffusionEngine.from_config(config.model, checkpoint_activations=False)  # no backward pass
    if not args.load:
        raise ConfigError("args.load: give the checkpoint to sample from (a run folder, iteration folder or file)")
    load_network(engine.network, args.load, strict=args.strict_load)
    engine.to(device, DTYPES[(bool(args.bf16), bool(args.fp16))]).eval()

    network = config.model.network_config.params
    latent_frames = args.sampling_num_frames or (network.num_frames - 1) // VAE_TEMPORAL + 1
    height, width = args.sampling_image_size or (network.latent_height * VAE_SPATIAL, network.latent_width * VAE_SPATIAL)
    latent_shape = (latent_frames, args.latent_channels, height // VAE_SPATIAL, width // VAE_SPATIAL)

    if args.input_type == "txt":
        if not args.input_file:
            raise ConfigError("args.input_file: give a text file with one prompt per line (or args.input_type=cli)")
        prompts = read_prompts(args.input_file)
    else:
        prompts = interactive_prompts()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, line in enumerate(prompts):
        prompt, _, image_path = line.partition("@@")
        first_frames = None
        if args.image2video:
            if not image_path:
                raise ConfigError(f"args.image2video: prompt {index} has no '@@image_path' part: {line!r}")
            first_frames = load_first_frame(image_path.strip(), height, width)[None].expand(args.num_samples, -1, -1, -1)
        seed = args.seed + index
        generator = torch.Generator(device).manual_seed(seed)
        latents = engine.sample([prompt.strip()] * args.num_samples, latent_shape, generator, first_frames=first_frames)
        videos = engine.decode_first_stage(latents, chunk_frames=args.decode_chunk_frames)
        for sample, video in enumerate(videos):
            name = f"{index:03d}_{sample}_{slugify(prompt)}.mp4"
            save_video(video.cpu(), str(output_dir / name), fps=args.sampling_fps)
            write_manifest_line(str(output_dir), {"file": name, "prompt": prompt.strip(), "seed": seed})
            print(f"wrote {output_dir / name}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
