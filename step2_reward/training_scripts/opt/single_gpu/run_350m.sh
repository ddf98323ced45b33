#!/usr/bin/env bash
# Step 2 (reward model): full fine-tuning of facebook/opt-350m as a reward model on Dahoas/rm-static
# on one GPU (DeepSpeed-Chat's single_gpu script: weight decay 0.1, dropout off, 4 accumulation steps,
# the other flags at their defaults: 1 epoch, lr 5e-5, micro batch 16 pairs, fp16). OPT's tokenizer
# starts every row with its BOS token, which equals the pad id: --num_padding_at_beginning 1.
# DeepSpeed-Chat gets rm-static from its --data_path default; ours defaults to the bundled toy task,
# so it is named here. TensorBoard events go to $OUTPUT/ds_tensorboard_logs/step2_model_tensorboard,
# as in DeepSpeed-Chat.
#
# Usage: run_350m.sh [OUTPUT=./output] [ZERO_STAGE=0] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 "$ROOT/step2_reward/main.py" \
   --data_path Dahoas/rm-static \
   --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 \
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
