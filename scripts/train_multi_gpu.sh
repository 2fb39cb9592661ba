#!/usr/bin/env bash
# Fine-tune on all GPUs of one node with DeepSpeed data parallelism (ZeRO stage from the config).
# Usage: NGPU=8 scripts/train_multi_gpu.sh configs/cogvideox_5b.yaml configs/sft.yaml args.load=CogVideoX-5b-sat/transformer
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
torchrun --standalone --nproc_per_node="$NGPU" train_video.py --base "$@"
