#!/usr/bin/env bash
# Step 1 (SFT): full fine-tuning of sberbank-ai/mGPT on Japanese question-answer data on one node with 8 GPUs
# (DeepSpeed-Chat's Japanese script:
# mkqa-Japanese, Cohere/miracl-ja-queries-22-12, lmqg/qg_jaquad and lmqg/qag_jaquad;
# 16 epochs, lr 9.65e-6, micro batch 8 per GPU, fp16).
# These sets mostly hold one answer per prompt, no rejected one, so every row goes to step 1
# (--data_split 10,0,0) and the script stops at SFT, as DeepSpeed-Chat's does.
#
# Usage: run_japanese.sh [OUTPUT=./output] [ZERO_STAGE=2] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step1_sft/main.py" \
   --data_path mkqa-Japanese Cohere/miracl-ja-queries-22-12 lmqg/qg_jaquad lmqg/qag_jaquad \
   --data_split 10,0,0 \
   --model_name_or_path sberbank-ai/mGPT \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.0 \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
