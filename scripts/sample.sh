#!/usr/bin/env bash
# Sample with a model config and configs/inference.yaml.
# Usage: scripts/sample.sh configs/cogvideox_5b.yaml args.load=CogVideoX-5b-sat/transformer args.input_file=prompts.txt
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1; shift
python sample_video.py --base "$model" configs/inference.yaml "$@"
