"""Convert CogVideoX weights between the SAT layout (satvideo, official SAT checkpoints) and diffusers.

    sat-to-diffusers   --config cogvideox_5b.yaml --checkpoint CKPT --out DIR [--vae 3d-vae.pt --vae-out DIR]
    diffusers-to-sat   --transformer DIR --out SAT_DIR [--vae DIR]
    lora-to-diffusers  --checkpoint SAT_LORA_CKPT --out DIR [--lora-alpha A]   (alpha: from the checkpoint)
    lora-merge         --checkpoint SAT_LORA_CKPT --out DIR [--lora-base BASE] [--scale S]
                       (a plain SAT checkpoint with the adapters merged, for the official sampling)

Inputs are read and checked (the weights against the config they are converted with) before anything is written;
each output folder then appears whole or not at all. An output folder that exists and is not empty is refused
unless --overwrite, which replaces it. Errors are one line (the traceback with --debug).
"""

import argparse
import math
from pathlib import Path

from satvideo.cli import check_output_folder, run_entrypoint
from satvideo.config import ConfigError
from satvideo.convert.checkpoints import (LORA_WEIGHTS_NAME, diffusers_to_sat_checkpoint,
                                          sat_lora_to_diffusers_checkpoint, sat_to_diffusers_checkpoint)
from satvideo.convert.lora import is_lora_alpha
from satvideo.sampling.adapters import write_merged_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    common.add_argument("--debug", action="store_true", help="show the traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    to_diffusers = commands.add_parser("sat-to-diffusers", parents=[common],
                                       help="SAT transformer (and VAE) -> diffusers folders")
    to_diffusers.add_argument("--config", nargs="+", required=True, help="model YAML(s), merged in order")
    to_diffusers.add_argument("--checkpoint", required=True,
                              help="SAT run folder (with `latest`), iteration folder or mp_rank_00_model_states.pt")
    to_diffusers.add_argument("--out", required=True, help="folder for CogVideoXTransformer3DModel")
    to_diffusers.add_argument("--vae", help="SAT 3d-vae.pt (optional)")
    to_diffusers.add_argument("--vae-out", help="folder for AutoencoderKLCogVideoX (with --vae)")

    to_sat = commands.add_parser("diffusers-to-sat", parents=[common],
                                 help="diffusers folders -> SAT checkpoint and model.yaml")
    to_sat.add_argument("--transformer", required=True, help="diffusers CogVideoXTransformer3DModel folder")
    to_sat.add_argument("--out", required=True, help="SAT folder: transformer/, vae/, model.yaml")
    to_sat.add_argument("--vae", help="diffusers AutoencoderKLCogVideoX folder (optional)")

    lora = commands.add_parser("lora-to-diffusers", parents=[common],
                               help="SAT LoRA checkpoint -> pytorch_lora_weights.safetensors")
    lora.add_argument("--checkpoint", required=True, help="SAT checkpoint of a LoRA fine-tune")
    lora.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="lora_config lora_alpha of the run (default: recorded in satvideo adapter checkpoints; 1)")
    merge = commands.add_parser("lora-merge", parents=[common],
                                help="SAT LoRA checkpoint -> plain SAT checkpoint with the adapters merged")
    merge.add_argument("--checkpoint", required=True, help="satvideo LoRA run (adapters) or SAT LoRA checkpoint")
    merge.add_argument("--out", required=True, help="folder for the merged checkpoint (latest, 1/)")
    merge.add_argument("--lora-base", default=None, help="the base weights (default: the base the adapters record)")
    merge.add_argument("--scale", type=float, default=1.0, help="strength of the adapters (default 1)")
    return parser.parse_args()


def check_apart(outputs: list[tuple[str, str | None]], inputs: list[tuple[str, str | None]]) -> None:
    """ConfigError when an output folder holds another output or an input, or is one: output folders are replaced
    whole, and would take the other with them. Each path is given as (flag, path); None is a flag not given."""
    outputs = [(flag, Path(path).resolve()) for flag, path in outputs if path]
    others = outputs + [(flag, Path(path).resolve()) for flag, path in inputs if path]
    for flag, folder in outputs:
        for other_flag, other in others:
            if other_flag != flag and other.is_relative_to(folder):
                raise ConfigError(f"{other_flag} {other} lies in {flag} {folder}, which is written whole; give "
                                  "folders apart")


def main() -> None:
    args = parse_args()
    if args.command == "sat-to-diffusers":
        check_output_folder(args.out, "--out", args.overwrite)
        if args.vae_out is not None:
            check_output_folder(args.vae_out, "--vae-out", args.overwrite)
        inputs = [("--checkpoint", args.checkpoint), ("--vae", args.vae), *(("--config", path) for path in args.config)]
        check_apart([("--out", args.out), ("--vae-out", args.vae_out)], inputs)
        sat_to_diffusers_checkpoint(args.config, args.checkpoint, args.out, args.vae, args.vae_out)
    elif args.command == "diffusers-to-sat":
        check_output_folder(args.out, "--out", args.overwrite)
        check_apart([("--out", args.out)], [("--transformer", args.transformer), ("--vae", args.vae)])
        diffusers_to_sat_checkpoint(args.transformer, args.out, args.vae)
    elif args.command == "lora-merge":
        check_output_folder(args.out, "--out", args.overwrite)
        check_apart([("--out", args.out)], [("--checkpoint", args.checkpoint), ("--lora-base", args.lora_base)])
        if not math.isfinite(args.scale):
            raise ConfigError(f"--scale {args.scale}: expected a finite number")
        write_merged_checkpoint(args.checkpoint, args.out, args.lora_base, args.scale)
    else:
        # a folder that other files may share, in which one file is replaced
        check_output_folder(args.out, "--out", overwrite=True, replaced_whole=False)
        if (Path(args.out) / LORA_WEIGHTS_NAME).exists() and not args.overwrite:
            raise ConfigError(f"--out {args.out} holds {LORA_WEIGHTS_NAME} already; choose another folder or pass "
                              "--overwrite")
        if args.lora_alpha is not None and not is_lora_alpha(args.lora_alpha):
            raise ConfigError(f"--lora-alpha {args.lora_alpha}: expected a number > 0")
        sat_lora_to_diffusers_checkpoint(args.checkpoint, args.out, args.lora_alpha)
    print(f"{args.command}: wrote {args.out}")


if __name__ == "__main__":
    run_entrypoint(main)
