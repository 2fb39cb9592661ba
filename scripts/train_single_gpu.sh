#!/usr/bin/env bash
# Fine-tune on one GPU. Usage: scripts/train_single_gpu.sh configs/cogvideox_2b.yaml configs/sft.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python train_video.py --base "$@"
