#!/usr/bin/env bash
# Fine-tune on a Slurm cluster: one torchrun per node (srun), rendezvous on the first node of the job.
#   sbatch --nodes=4 --gpus-per-node=8 scripts/train_slurm.sh configs/cogvideox_5b.yaml configs/sft.yaml \
#     args.load=CogVideoX-5b-sat/transformer args.train_data=[my_data] args.save=checkpoints/my_5b
# A requeued job (--requeue, or a preemption) resumes from {save}/latest: the run folder's lock records the
# Slurm job id, so the job's next incarnation takes it over; any other live run on the folder is refused.
#SBATCH --job-name=satvideo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${SLURM_JOB_NODELIST:?run this with sbatch (or inside an salloc allocation)}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID" \
  train_video.py --base "$@"
