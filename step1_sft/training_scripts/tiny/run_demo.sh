#!/usr/bin/env bash
# Step 1 (SFT) of the demo pipeline that `python e2e_rlhf.py` runs with no arguments: the built-in
# tiny Llama model (no --model_name_or_path) fine-tuned on the bundled sorting task (no --data_path)
# for 2 epochs at lr 3e-3, in fp32 with plain data parallelism (ZeRO stage 0). These are the settings
# under which the SFT model learns enough of the task for steps 2 and 3 to improve on it (see the
# README's measured results). 8 rows per rank per step: 2 ranks give the batch of 16 it was measured with.
# NUM_RANKS: how many ranks `deepspeed --num_gpus` starts (GPUs, or CPU processes on gloo when there is
# no GPU); empty: every GPU of the machine. Flags after the positional arguments go to main.py as they are.
#
# Usage: run_demo.sh [OUTPUT=./output/step1_sft] [ZERO_STAGE=0] [NUM_RANKS=2] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output/step1_sft}
ZERO_STAGE=${2:-0}
NUM_RANKS=${3-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LAUNCH=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "$NUM_RANKS" ]]; then
   LAUNCH+=(--num_gpus "$NUM_RANKS")
fi
mkdir -p "$OUTPUT"

deepspeed "${LAUNCH[@]}" "$ROOT/step1_sft/main.py" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 16 \
   --max_seq_len 64 \
   --learning_rate 3e-3 \
   --num_train_epochs 2 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --dtype fp32 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:4}" \
   2>&1 | tee "$OUTPUT/training.log"
