"""Convert CogVideoX weights between the SAT layout (satvideo, official SAT checkpoints) and diffusers.

    sat-to-diffusers   --config cogvideox_5b.yaml --checkpoint CKPT --out DIR [--vae 3d-vae.pt --vae-out DIR]
    diffusers-to-sat   --transformer DIR --out SAT_DIR [--vae DIR]
    lora-to-diffusers  --checkpoint SAT_LORA_CKPT --out DIR [--lora-alpha A]   (alpha: from the checkpoint)
"""

import argparse

from satvideo.convert.checkpoints import (diffusers_to_sat_checkpoint, sat_lora_to_diffusers_checkpoint,
                                          sat_to_diffusers_checkpoint)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    to_diffusers = commands.add_parser("sat-to-diffusers", help="SAT transformer (and VAE) -> diffusers folders")
    to_diffusers.add_argument("--config", nargs="+", required=True, help="model YAML(s), merged in order")
    to_diffusers.add_argument("--checkpoint", required=True,
                              help="SAT run folder (with `latest`), iteration folder or mp_rank_00_model_states.pt")
    to_diffusers.add_argument("--out", required=True, help="folder for CogVideoXTransformer3DModel")
    to_diffusers.add_argument("--vae", help="SAT 3d-vae.pt (optional)")
    to_diffusers.add_argument("--vae-out", help="folder for AutoencoderKLCogVideoX (with --vae)")

    to_sat = commands.add_parser("diffusers-to-sat", help="diffusers folders -> SAT checkpoint and model.yaml")
    to_sat.add_argument("--transformer", required=True, help="diffusers CogVideoXTransformer3DModel folder")
    to_sat.add_argument("--out", required=True, help="SAT folder: transformer/, vae/, model.yaml")
    to_sat.add_argument("--vae", help="diffusers AutoencoderKLCogVideoX folder (optional)")

    lora = commands.add_parser("lora-to-diffusers", help="SAT LoRA checkpoint -> pytorch_lora_weights.safetensors")
    lora.add_argument("--checkpoint", required=True, help="SAT checkpoint of a LoRA fine-tune")
    lora.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="lora_config lora_alpha of the run (default: recorded in satvideo adapter checkpoints; 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.command == "sat-to-diffusers":
        sat_to_diffusers_checkpoint(args.config, args.checkpoint, args.out, args.vae, args.vae_out)
    elif args.command == "diffusers-to-sat":
        diffusers_to_sat_checkpoint(args.transformer, args.out, args.vae)
    else:
        sat_lora_to_diffusers_checkpoint(args.checkpoint, args.out, args.lora_alpha)
    print(f"{args.command}: wrote {args.out}")


if __name__ == "__main__":
    main()
