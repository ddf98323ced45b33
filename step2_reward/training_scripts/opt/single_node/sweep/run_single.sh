#!/usr/bin/env bash
# Step 2 (reward model) sweep point: facebook/opt-350m on one node, with the ZeRO stage and CPU offload
# chosen by the arguments (the shape of DeepSpeed-Chat's step-2 sweep: 4 Dahoas/yitingxie datasets,
# micro batch 4 pairs per GPU, lr 5e-5, weight decay 0.1, dropout off, 1 epoch, fp16). OPT's tokenizer
# starts every row with its BOS token, which equals the pad id: --num_padding_at_beginning 1.
# run_step2_sweep.sh calls it once per combination.
#
# The arguments come in DeepSpeed-Chat's order, with its default stage.
#
# Usage: run_single.sh [ZERO_STAGE=0] [OFFLOAD=false] [OUTPUT=./output] [main.py flags...]
set -euo pipefail

ZERO_STAGE=${1:-0}
OFFLOAD=${2:-false}
OUTPUT=${3:-./output}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OPTIONAL=()
if [[ "$OFFLOAD" == true ]]; then
   OPTIONAL+=(--offload)
fi
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step2_reward/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --num_train_epochs 1 \
   --dropout 0.0 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${OPTIONAL[@]}" \
   "${@:4}" \
   2>&1 | tee "$OUTPUT/training.log"
