#!/usr/bin/env bash
# First run on a GPU host (run it once after installing, and after changing CUDA, torch or DeepSpeed):
# on all visible GPUs, in under 10 minutes,
#   1. the tiny model: bf16 and fp16, each under ZeRO-2 and ZeRO-3, a resume, zero_to_fp32, sampling;
#   2. a mid-size model (CogVideoX-5B layout with 4 layers, random weights, a random 4096-wide T5 and the
#      official VAE widths) on 49x480x720 clips: bf16 under ZeRO-2 and ZeRO-3, fp16 under ZeRO-2;
#   3. peak GPU memory of each part (T5, VAE encode, transformer forward+backward, VAE decode) at that size.
# Nothing is downloaded; everything is written under $SMOKE_OUT (default /tmp/satvideo_gpu_smoke), which each run
# replaces: a folder that is not empty is refused unless an earlier run of this script made it.
#   scripts/gpu_smoke.sh            # then copy the summary at the end into benchmarks/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE_OUT=${SMOKE_OUT:-/tmp/satvideo_gpu_smoke}
MADE_HERE=.made_by_gpu_smoke  # marks a folder this script made, so that a later run may replace it
ours() { [ -d "$1" ] && { [ -e "$1/$MADE_HERE" ] || [ -z "$(ls -A "$1")" ]; }; }  # made here, or empty
if [ -e "$SMOKE_OUT" ] && ! ours "$SMOKE_OUT"; then
  echo "error: SMOKE_OUT=$SMOKE_OUT exists and was not made by this script; choose another SMOKE_OUT or remove it" >&2
  exit 2
fi
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "error: no CUDA device visible" >&2; exit 1; fi
LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node="$GPUS")
TINY=(configs/tiny/model.yaml configs/tiny/vae.yaml configs/tiny/train.yaml)
MID=(configs/cogvideox_5b.yaml configs/sft.yaml
     model.network_config.params.num_layers=4 model.first_stage_config.params.ckpt_path=null
     "model.conditioner_config.params.emb_models=[{is_trainable: false, input_key: txt, ucg_rate: 0.1, target: satvideo.conditioner.TinyT5Embedder, params: {max_length: 226, d_model: 4096, d_ff: 10240, num_heads: 64}}]"
     args.load=null args.num_workers=2 args.log_interval=1 args.train_iters=3 args.save_interval=3)
step() { printf '\n=== %s\n' "$*"; }
start=$SECONDS
rm -rf "$SMOKE_OUT"; mkdir -p "$SMOKE_OUT"; touch "$SMOKE_OUT/$MADE_HERE"

step "toy data: 16 clips of 9 frames at 32 px (tiny model) and 8 clips of 49 frames (mid-size model)"
python scripts/make_toy_dataset.py --out "$SMOKE_OUT/toy" --num 16 --size 32 --frames 9 --fps 8
python scripts/make_toy_dataset.py --out "$SMOKE_OUT/toy49" --num 8 --size 64 --frames 49 --fps 8

for precision in bf16 fp16; do
  for stage in 0 2 3; do
    step "tiny model, $precision, ZeRO-$stage, $GPUS GPU(s)"
    "${LAUNCH[@]}" train_video.py --base "${TINY[@]}" args.device=cuda args.$precision=true args.zero_stage=$stage \
      args.save="$SMOKE_OUT/tiny_${precision}_zero$stage" args.train_data="[$SMOKE_OUT/toy]" args.train_iters=20 \
      args.save_interval=10 args.batch_size=2
  done
done
step "resume: the bf16 run continues from iteration 20 to 30"
"${LAUNCH[@]}" train_video.py --base "${TINY[@]}" args.device=cuda args.bf16=true args.zero_stage=2 \
  args.save="$SMOKE_OUT/tiny_bf16_zero2" args.train_data="[$SMOKE_OUT/toy]" args.train_iters=30 args.save_interval=10 args.batch_size=2
step "DeepSpeed's zero_to_fp32 on the ZeRO-3 checkpoint"
python -c "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as g; \
print(len(g('$SMOKE_OUT/tiny_fp16_zero3', tag='20')), 'tensors')"
step "sampling from the resumed run (bf16)"
"${LAUNCH[@]}" sample_video.py --base configs/tiny/model.yaml configs/tiny/vae.yaml configs/tiny/sample.yaml \
  args.device=cuda args.bf16=true args.load="$SMOKE_OUT/tiny_bf16_zero2" args.output_dir="$SMOKE_OUT/videos"

for run in bf16:2 bf16:3 fp16:2; do
  precision=${run%:*} stage=${run#*:}
  step "mid-size model (5B layout, 4 layers), 49x480x720, $precision, ZeRO-$stage"
  "${LAUNCH[@]}" train_video.py --base "${MID[@]}" args.$precision=true args.zero_stage=$stage \
    args.save="$SMOKE_OUT/mid_${precision}_zero$stage" args.train_data="[$SMOKE_OUT/toy49]"
done

step "peak GPU memory per part at 49x480x720, bf16 (one GPU)"
python - "${MID[@]}" <<'EOF'
import sys
import torch
from satvideo import distributed
from satvideo.config import load_config
from satvideo.engine import VideoDiffusionEngine

config = load_config([a for a in sys.argv[1:] if a.endswith(".yaml")], [a for a in sys.argv[1:] if not a.endswith(".yaml")])
device = distributed.init_device("cuda")
engine = VideoDiffusionEngine.from_config(config.model).to(device, torch.bfloat16)
engine.place_frozen_parts(device, torch.bfloat16)
video = torch.rand(1, 49, 3, 480, 720, device=device, dtype=torch.bfloat16) * 2 - 1

def peak(label, fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    result = fn(); torch.cuda.synchronize()
    print(f"{label:<32} peak {(torch.cuda.max_memory_allocated() - base) / 2**30:6.2f} GiB above "
          f"{base / 2**30:.2f} GiB resident", flush=True)
    return result

peak("T5 (4096 wide, 1 layer, random)", lambda: engine.conditioner({"txt": ["a prompt"]}))
latents = peak("VAE encode 49x480x720", lambda: engine.encode_first_stage(video))
def forward_backward():
    loss = engine({"mp4": video, "txt": ["a prompt"]}); loss.backward()
peak("training step: encode + DiT fwd+bwd", forward_backward)
peak("VAE decode (2-frame chunks)", lambda: engine.decode_first_stage(latents))
EOF

step "gpu smoke test passed in $((SECONDS - start)) s on $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
