#!/usr/bin/env bash
# Step 1 (SFT): facebook/opt-30b with LoRA on one node with 8 GPUs and ZeRO-3 (DeepSpeed-Chat's
# single_node 30b LoRA script: 4 Dahoas/yitingxie datasets, 16 epochs, lr 9.65e-6, micro batch 4 per
# GPU, gradient checkpointing, rank-128 LoRA, the adapted weights frozen, the rest training, fp16). DeepSpeed-Chat's
# LoRA default matches OPT's decoder layers; ours ('auto') matches every decoder Linear layer, the same
# ones for OPT.
#
# Usage: run_30b_lora.sh [OUTPUT=./output] [ZERO_STAGE=3] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-30b \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.0 \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --lora_dim 128 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
