"""Train a video diffusion transformer.

    python train_video.py --base configs/tiny/model.yaml configs/tiny/train.yaml args.train_iters=50
    torchrun --standalone --nproc_per_node=8 train_video.py --base configs/cogvideox_5b.yaml configs/sft.yaml
"""

from satvideo.cli import parse_config, run_entrypoint
from satvideo.training.loop import train

if __name__ == "__main__":
    run_entrypoint(lambda: train(parse_config("Train a video diffusion transformer with DeepSpeed.")))
