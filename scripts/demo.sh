#!/usr/bin/env bash
# `make demo`: the whole path on a CPU in a few minutes.
#   toy videos -> tiny 3D causal VAE -> tiny diffusion transformer (DeepSpeed, ZeRO-2) -> sampled mp4s -> colour check
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/toy
RUN=checkpoints/demo
OUT=outputs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MODEL_CONFIGS="configs/tiny/model.yaml configs/tiny/vae.yaml $RUN/vae/vae.yaml"
step() { printf '\n=== %s\n' "$*"; }
start=$SECONDS
rm -rf "$DATA" "$RUN" "$OUT"

step "1/5 toy dataset: coloured shapes moving in named directions, captioned to match -> $DATA"
python scripts/make_toy_dataset.py --out "$DATA" --num 64 --size 32 --frames 9 --fps 8

step "2/5 tiny 3D causal VAE (8x8 spatial, 4x temporal compression), trained on the toy clips -> $RUN/vae"
python -m satvideo.vae.train --data "$DATA" --out "$RUN/vae/3d-vae.pt" --overlay "$RUN/vae/vae.yaml" \
  --config configs/tiny/vae.yaml --size 32 --frames 9 --iters "${VAE_ITERS:-800}"

step "3/5 tiny diffusion transformer, trained with DeepSpeed on the CPU -> $RUN/dit"
python train_video.py --base $MODEL_CONFIGS configs/tiny/train.yaml \
  args.save="$RUN/dit" args.train_data="[$DATA]" args.train_iters="${DIT_ITERS:-3000}" args.save_interval=1000000 \
  args.log_interval=500

step "4/5 sampling the prompts of configs/tiny/prompts.txt -> $OUT"
python sample_video.py --base $MODEL_CONFIGS configs/tiny/sample.yaml args.load="$RUN/dit" args.output_dir="$OUT"

step "5/5 does the generated shape have the colour the prompt asks for?"
python scripts/check_colors.py "$OUT"

step "done in $((SECONDS - start)) s: videos in $OUT/ (manifest.jsonl lists prompt and seed of each)"
