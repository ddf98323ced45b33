#!/usr/bin/env bash
# Step 1 (SFT) sweep point: facebook/opt-1.3b on Dahoas/rm-static on one node, with the ZeRO stage,
# CPU offload and rank-128 LoRA chosen by the arguments (the shape of DeepSpeed-Chat's step-1 sweep:
# micro batch 4 per GPU, lr 9.65e-6, 16 epochs, cosine schedule, fp16). run_step1_sweep.sh calls it
# once per combination.
#
# Usage: run_single.sh [OUTPUT=./output] [ZERO_STAGE=2] [OFFLOAD=false] [LORA=false] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output}
ZERO_STAGE=${2:-2}
OFFLOAD=${3:-false}
LORA=${4:-false}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OPTIONAL=()
if [[ "$OFFLOAD" == true ]]; then
   OPTIONAL+=(--offload)
fi
if [[ "$LORA" == true ]]; then
   OPTIONAL+=(--lora_dim 128 --lora_module_name decoder.layers.)
fi
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-1.3b \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
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
   "${OPTIONAL[@]}" \
   "${@:5}" \
   2>&1 | tee "$OUTPUT/training.log"
