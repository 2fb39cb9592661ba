#!/usr/bin/env bash
# Fine-tune across nodes: run this on every node with the same MASTER_ADDR and its own NODE_RANK.
# Usage: NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/train_multi_node.sh configs/cogvideox_5b.yaml configs/sft.yaml
# (Under SLURM: NODE_RANK=$SLURM_NODEID NNODES=$SLURM_NNODES, MASTER_ADDR from `scontrol show hostnames | head -1`.)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NGPU" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" train_video.py --base "$@"
