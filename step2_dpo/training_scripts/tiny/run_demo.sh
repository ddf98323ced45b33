#!/usr/bin/env bash
# Step 2 (DPO) of the demo pipeline that `python e2e_rlhf.py --algorithm dpo` runs: the step-1 model (MODEL,
# the folder step1_sft/training_scripts/tiny/run_demo.sh writes) trained directly on the bundled sorting pairs
# (step 2's slice, as the reward model reads them) against a frozen copy of itself, in place of steps 2 + 3.
# fp32, ZeRO stage 0, full fine-tuning, as the other demo steps; the reference is a frozen copy (the default for
# full fine-tuning; 0.45 GB peak per rank, as with LoRA rank 8 and the adapters-off reference, which learned far
# less here: rule success 0.18). 8 pairs per rank per step, one epoch (100 steps), lr 3e-4, beta 0.1, --nll_coef
# 1: plain DPO lowered the chosen answers' log-probs with the rejected ones and moved their mass to stray bytes
# (rule success 0.17 -> 0.01 at lr 3e-4, 0.08 at 1e-4, 0.11 with beta 1, 0.19 at 3e-5); the chosen answer's NLL
# term keeps it on sorted lists (0.28). Measured in docs/step2_dpo.md (In the pipeline).
# NUM_RANKS: how many ranks `deepspeed --num_gpus` starts (GPUs, or CPU processes on gloo when there is
# no GPU); empty: every GPU of the machine. Flags after the positional arguments go to main.py as they are.
#
# Usage: run_demo.sh [OUTPUT=./output/step2_dpo] [ZERO_STAGE=0] [MODEL=./output/step1_sft] [NUM_RANKS=2]
#                    [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output/step2_dpo}
ZERO_STAGE=${2:-0}
MODEL=${3:-./output/step1_sft}
NUM_RANKS=${4-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LAUNCH=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "$NUM_RANKS" ]]; then
   LAUNCH+=(--num_gpus "$NUM_RANKS")
fi
mkdir -p "$OUTPUT"

deepspeed "${LAUNCH[@]}" "$ROOT/step2_dpo/main.py" \
   --model_name_or_path "$MODEL" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 16 \
   --max_seq_len 64 \
   --learning_rate 3e-4 \
   --num_train_epochs 1 \
   --beta 0.1 \
   --nll_coef 1.0 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --dtype fp32 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:5}" \
   2>&1 | tee "$OUTPUT/training.log"
