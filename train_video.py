"""Train a video diffusion transformer.

    python train_video.py --base configs/tiny/model.yaml configs/tiny/train.yaml args.train_iters=50
    torchrun --standalone --nproc_per_node=8 train_video.py --base configs/cogvideox_5b.yaml configs/sft.yaml
"""

import logging

from satvideo.cli import parse_config
from satvideo.training.loop import train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_config("Train a video diffusion transformer with DeepSpeed."))
