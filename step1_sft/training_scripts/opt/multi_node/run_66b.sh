#!/usr/bin/env bash
# Step 1 (SFT): LoRA fine-tuning of facebook/opt-66b on several 8-GPU nodes with ZeRO-3 and
# gradient checkpointing (DeepSpeed-Chat's multi_node script: 4 Dahoas/yitingxie datasets, 2 epochs,
# lr 1e-4, weight decay 0.1, rank-128 LoRA on OPT's decoder layers).
# The nodes are listed in a DeepSpeed hostfile ("<host> slots=8" per line): $HOSTFILE, default
# /job/hostfile (DeepSpeed's own default). Run from the first node; every node needs this repository
# at the same path.
#
# Usage: [HOSTFILE=/path/hostfile] run_66b.sh [OUTPUT=./output] [ZERO_STAGE=3] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-3}
HOSTFILE=${HOSTFILE:-/job/hostfile}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --hostfile "$HOSTFILE" "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-66b \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 1e-4 \
   --weight_decay 0.1 \
   --num_train_epochs 2 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --lora_dim 128 \
   --lora_module_name decoder.layers. \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
