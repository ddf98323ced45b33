#!/usr/bin/env bash
# Step 1 (SFT): LoRA fine-tuning of facebook/opt-6.7b on one GPU (DeepSpeed-Chat's single_gpu
# 6.7b LoRA script: 4 Dahoas/yitingxie datasets, 16 epochs, lr 1e-3, micro batch 8, 16 accumulation
# steps, gradient checkpointing, rank-128 LoRA on the decoder layers, fp16). As in DeepSpeed-Chat the
# adapted Linear weights stay frozen and the rest trains (add --only_optimize_lora to train LoRA alone).
#
# Usage: run_6.7b_lora.sh [OUTPUT=./output] [ZERO_STAGE=0] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-6.7b \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 1e-3 \
   --weight_decay 0.0 \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 16 \
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
