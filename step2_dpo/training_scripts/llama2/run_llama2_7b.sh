#!/usr/bin/env bash
# Step 2 (DPO): full DPO fine-tuning of meta-llama/Llama-2-7b-hf on one node with 8 GPUs, ZeRO-3 with CPU
# offload and gradient checkpointing (DeepSpeed-Chat's DPO llama2 script: Dahoas/rm-static, 1 epoch, lr
# 9.65e-6, weight decay 0.1, micro batch 8 pairs per GPU). The frozen reference copy is partitioned like the
# policy (ZeRO-3); add --offload_reference_model to keep its partitions on the CPU, or --precompute_ref_logps
# to compute its log-probs once before training and hold no reference at all. The model is gated on the
# Hugging Face hub: accept its licence and log in first.
#
# Usage: run_llama2_7b.sh [OUTPUT=./output_step2_dpo_llama2_7b] [ZERO_STAGE=3] [main.py flags...]   (--offload needs ZERO_STAGE 2 or 3)
set -euo pipefail

OUTPUT=${1:-./output_step2_dpo_llama2_7b}
ZERO_STAGE=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step2_dpo/main.py" \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --offload \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
