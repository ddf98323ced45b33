#!/usr/bin/env bash
# Step 2 (DPO): a quick end-to-end check on a CPU-only machine (no GPU needed): 2 CPU ranks train the
# built-in tiny Llama model with DPO on the bundled synthetic sorting pairs (no --data_path), ZeRO-3,
# rank-8 LoRA on a frozen base (--only_optimize_lora: the reference is the policy with its adapters switched
# off, no second copy) and bf16 (DeepSpeed cannot run fp16 on a CPU), evaluating every 50 optimizer steps.
# By default it starts from the built-in model's random weights; pass a step-1 output folder as MODEL (e.g.
# the one step1_sft/training_scripts/tiny/run_cpu.sh wrote) to start from the fine-tuned model, as DPO is
# meant to.
#
# Usage: run_cpu.sh [OUTPUT=./output_step2_dpo_tiny] [ZERO_STAGE=3] [MODEL=built-in tiny model] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output_step2_dpo_tiny}
ZERO_STAGE=${2:-3}
MODEL=${3:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

MODEL_ARGS=()
if [[ -n "$MODEL" ]]; then
   MODEL_ARGS=(--model_name_or_path "$MODEL")
fi

deepspeed --num_gpus 2 "$ROOT/step2_dpo/main.py" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 64 \
   --learning_rate 1e-3 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --seed 1234 \
   --eval_interval 50 \
   --zero_stage "$ZERO_STAGE" \
   --lora_dim 8 \
   --only_optimize_lora \
   --lora_learning_rate 1e-3 \
   --dtype bf16 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${MODEL_ARGS[@]}" \
   "${@:4}" \
   2>&1 | tee "$OUTPUT/training.log"
