#!/usr/bin/env bash
# Step 2 (DPO): full DPO fine-tuning of facebook/opt-350m on one GPU (DeepSpeed-Chat's DPO single_gpu
# script: weight decay 0.1, dropout off, 4 accumulation steps, the other flags at their defaults: 1 epoch,
# lr 1e-3, micro batch 16 pairs, fp16, sigmoid loss with beta 0.1, a frozen copy as the reference).
# DeepSpeed-Chat gets rm-static from its --data_path default; ours defaults to the bundled toy task, so it
# is named here. TensorBoard events go to $OUTPUT/ds_tensorboard_logs/step2_model_tensorboard, as in
# DeepSpeed-Chat.
#
# Usage: run_350m.sh [OUTPUT=./output] [ZERO_STAGE=0] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 "$ROOT/step2_dpo/main.py" \
   --data_path Dahoas/rm-static \
   --model_name_or_path facebook/opt-350m \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --gradient_accumulation_steps 4 \
   --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
