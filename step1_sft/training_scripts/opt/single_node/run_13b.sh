#!/usr/bin/env bash
# Step 1 (SFT): facebook/opt-13b on one node with 8 GPUs and ZeRO-3 (DeepSpeed-Chat's single_node
# 13b script: 4 Dahoas/yitingxie datasets, 16 epochs, lr 1e-4, micro batch 4 per GPU, gradient
# checkpointing, rank-128 LoRA on the decoder layers, the adapted weights frozen, the rest training, fp16).
#
# Usage: run_13b.sh [OUTPUT=./output] [ZERO_STAGE=3] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-13b \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 1e-4 \
   --weight_decay 0.0 \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --lora_dim 128 \
   --lora_module_name decoder.layers. \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
