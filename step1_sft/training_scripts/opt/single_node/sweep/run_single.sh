#!/usr/bin/env bash
# Step 1 (SFT) sweep point: facebook/opt-1.3b on DeepSpeed-Chat's four Dahoas/yitingxie datasets on one
# node, with the ZeRO stage, CPU offload and rank-128 LoRA chosen by the arguments (DeepSpeed-Chat's step-1
# sweep: micro batch 8 per GPU, 16 epochs, cosine schedule, fp16; full fine-tuning at lr 9.65e-6 and no
# weight decay, LoRA with only the LoRA weights trained at lr 1e-3 and weight decay 0.1).
# run_step1_sweep.sh calls it once per combination.
#
# The arguments come in DeepSpeed-Chat's order.
#
# Usage: run_single.sh [ZERO_STAGE=2] [OFFLOAD=false] [LORA=false] [OUTPUT=./output] [main.py flags...]
set -euo pipefail

ZERO_STAGE=${1:-2}
OFFLOAD=${2:-false}
LORA=${3:-false}
OUTPUT=${4:-./output}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OPTIONAL=()
LEARNING_RATE=9.65e-6
WEIGHT_DECAY=0.0
if [[ "$OFFLOAD" == true ]]; then
   OPTIONAL+=(--offload)
fi
if [[ "$LORA" == true ]]; then
   OPTIONAL+=(--lora_dim 128 --lora_module_name decoder.layers. --only_optimize_lora)
   LEARNING_RATE=1e-3
   WEIGHT_DECAY=0.1
fi
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-1.3b \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate "$LEARNING_RATE" \
   --weight_decay "$WEIGHT_DECAY" \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${OPTIONAL[@]}" \
   "${@:5}" \
   2>&1 | tee "$OUTPUT/training.log"
