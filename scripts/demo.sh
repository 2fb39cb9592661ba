#!/usr/bin/env bash
# `make demo`: the whole path on a CPU in under 10 minutes.
#   toy videos -> tiny 3D causal VAE -> cache of latents and text features -> diffusion transformer (DeepSpeed,
#   ZeRO-2, from the cache) -> sampled mp4s -> check of colour, shape count and motion, and a contact sheet
# DEMO_SEED (default 1234) seeds training and sampling; VAE_ITERS and DIT_ITERS change the budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/toy
CACHE=data/toy_cache
RUN=checkpoints/demo
OUT=outputs
SEED=${DEMO_SEED:-1234}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MODEL_CONFIGS="configs/tiny/model.yaml configs/tiny/vae.yaml $RUN/vae/vae.yaml configs/tiny/demo.yaml"
step() { printf '\n=== %s\n' "$*"; }
start=$SECONDS
rm -rf "$DATA" "$CACHE" "$RUN" "$OUT"

step "1/6 toy dataset: coloured shapes moving in named directions, captioned to match -> $DATA"
python scripts/make_toy_dataset.py --out "$DATA" --num 64 --size 32 --frames 9 --fps 8

step "2/6 tiny 3D causal VAE (8x8 spatial, 4x temporal compression), trained on the toy clips -> $RUN/vae"
python -m satvideo.vae.train --data "$DATA" --out "$RUN/vae/3d-vae.pt" --overlay "$RUN/vae/vae.yaml" \
  --config configs/tiny/vae.yaml --size 32 --frames 9 --iters "${VAE_ITERS:-800}"

step "3/6 cache: VAE posterior moments and text features of every clip -> $CACHE"
python scripts/precompute.py --out "$CACHE" --base $MODEL_CONFIGS configs/tiny/train.yaml args.train_data="[$DATA]"

step "4/6 diffusion transformer, trained with DeepSpeed on the CPU from the cache -> $RUN/dit"
python train_video.py --base $MODEL_CONFIGS configs/tiny/train.yaml data.target=satvideo.data.CachedDataset \
  args.save="$RUN/dit" args.train_data="[$CACHE]" args.train_iters="${DIT_ITERS:-4000}" args.save_interval=1000000 \
  args.log_interval=500 args.seed="$SEED"

step "5/6 sampling the prompts of configs/tiny/prompts.txt -> $OUT"
python sample_video.py --base $MODEL_CONFIGS configs/tiny/sample.yaml args.load="$RUN/dit" args.output_dir="$OUT" \
  args.seed="$SEED"

step "6/6 does each video show the prompted colour, one shape per frame, moving the prompted way?"
python scripts/check_toy_videos.py "$OUT" --contact-sheet "$OUT/contact_sheet.png"

step "done in $((SECONDS - start)) s: videos in $OUT/ (each with a .json sidecar), all of them side by side in $OUT/contact_sheet.png"
