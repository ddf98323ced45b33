#!/usr/bin/env bash
# Step 1 (SFT): a quick end-to-end check on a CPU-only machine (no GPU needed): 2 CPU ranks train
# the built-in tiny Llama model on the bundled synthetic sorting data (no --model_name_or_path, no
# --data_path) with ZeRO-3, parameter and optimizer offload, rank-8 LoRA, gradient checkpointing and
# bf16 (DeepSpeed cannot run fp16 on a CPU). Takes a few minutes.
#
# Usage: run_cpu.sh [OUTPUT=./output_step1_tiny] [ZERO_STAGE=3] [main.py flags...]   (--offload needs ZERO_STAGE 2 or 3)
set -euo pipefail

OUTPUT=${1:-./output_step1_tiny}
ZERO_STAGE=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 2 "$ROOT/step1_sft/main.py" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 64 \
   --learning_rate 1e-3 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --offload \
   --lora_dim 8 \
   --gradient_checkpointing \
   --dtype bf16 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
