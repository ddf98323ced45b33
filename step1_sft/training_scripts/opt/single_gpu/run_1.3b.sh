#!/usr/bin/env bash
# Step 1 (SFT): LoRA fine-tuning of facebook/opt-1.3b on Dahoas/rm-static on one GPU (DeepSpeed-Chat's
# single_gpu script: rank-128 LoRA on every decoder Linear layer, 8 accumulation steps, the other
# flags at their defaults: 1 epoch, lr 1e-3, micro batch 16, fp16). DeepSpeed-Chat gets rm-static
# from its --data_path default; ours defaults to the bundled toy task, so it is named here.
# TensorBoard events go to $OUTPUT/ds_tensorboard_logs/step1_model_tensorboard, as in DeepSpeed-Chat.
#
# Usage: run_1.3b.sh [OUTPUT=./output] [ZERO_STAGE=0] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static \
   --model_name_or_path facebook/opt-1.3b \
   --gradient_accumulation_steps 8 \
   --lora_dim 128 \
   --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
