"""Sample videos from a trained model, with the same configs as training.

    python sample_video.py --base configs/tiny/model.yaml configs/tiny/sample.yaml args.load=checkpoints/tiny
    python sample_video.py --base configs/cogvideox_5b.yaml configs/inference.yaml args.input_file=prompts.txt

Prompts come from `args.input_file` (one per line; `prompt@@image.png` for image-to-video) or, with
`args.input_type=cli`, from the terminal. Each prompt gives an mp4 (or, with `args.only_save_latents`, a
safetensors file of latents) in `args.output_dir` and a line in its `manifest.jsonl` (file, prompt, seed).
`args.load` may be a LoRA adapter checkpoint (loaded over `args.lora_base` or the base it records, scaled by
`args.lora_scale`); `args.use_ema` loads the checkpoint's EMA weights.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from satvideo import distributed
from satvideo.checkpoint import load_network
from satvideo.cli import parse_config, run_entrypoint
from satvideo.config import ConfigError, args_namespace
from satvideo.engine import VideoDiffusionEngine
from satvideo.sampling import (VideoPlan, add_lora_from_checkpoint, interactive_prompts, read_prompts, sampling_dtype,
                               save_video, slugify, write_manifest_line)


def main() -> None:
    config = parse_config("Sample videos from a video diffusion transformer.")
    args = args_namespace(config)
    if not args.load:
        raise ConfigError("args.load: give the checkpoint to sample from (a run folder, iteration folder or file)")
    plan = VideoPlan(args, config.model.network_config.params)

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

    add_lora_from_checkpoint(config, args.load)
    engine = VideoDiffusionEngine.from_config(config.model, checkpoint_activations=False)  # no backward pass
    load_network(engine.network, args.load, strict=args.strict_load, lora_base=args.lora_base,
                 lora_scale=args.lora_scale, use_ema=args.use_ema)
    engine.to(device, sampling_dtype(args)).eval()
    engine.place_frozen_parts(device, sampling_dtype(args))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, line in prompts:
        prompt, latent_shape, first_frames = plan.video(line, index, args.num_samples)
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
