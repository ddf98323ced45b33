#!/usr/bin/env bash
# Step 2 (DPO): full DPO fine-tuning of facebook/opt-350m on several nodes (DeepSpeed-Chat's DPO multi_node
# script: 4 Dahoas/yitingxie datasets, 1 epoch, lr 5e-5, weight decay 0.1, dropout off, micro batch 2 pairs
# per GPU). The nodes are listed in HOSTFILE (DeepSpeed's hostfile format; default /job/hostfile).
#
# Usage: HOSTFILE=... run_350m.sh [OUTPUT=./output] [ZERO_STAGE=0] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
HOSTFILE=${HOSTFILE:-/job/hostfile}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --hostfile "$HOSTFILE" "$ROOT/step2_dpo/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-350m \
   --per_device_train_batch_size 2 \
   --per_device_eval_batch_size 2 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
