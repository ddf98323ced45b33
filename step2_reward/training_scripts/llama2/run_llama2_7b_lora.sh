#!/usr/bin/env bash
# Step 2 (reward model): LoRA fine-tuning of meta-llama/Llama-2-7b-hf as a reward model on one node
# with 8 GPUs, ZeRO-3 with CPU offload and gradient checkpointing: rank-128 LoRA on the Linear layers
# under "layers.", Dahoas/rm-static, 1 epoch, micro batch 8 pairs per GPU (DeepSpeed-Chat's llama2
# LoRA script). As in DeepSpeed-Chat, the adapted Linear weights stay frozen, the rest of the model trains
# at --learning_rate 9.65e-6 and the LoRA weights at --lora_learning_rate (5e-4); add --only_optimize_lora
# to train LoRA alone (the value head always trains). Llama-2's BOS is not its pad token: --num_padding_at_beginning 0. The model is
# gated on the Hugging Face hub: accept its licence and log in first.
#
# Usage: run_llama2_7b_lora.sh [OUTPUT=./output_step2_llama2_7b_lora] [ZERO_STAGE=3] [main.py flags...]   (--offload needs ZERO_STAGE 2 or 3)
set -euo pipefail

OUTPUT=${1:-./output_step2_llama2_7b_lora}
ZERO_STAGE=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step2_reward/main.py" \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_padding_at_beginning 0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --offload \
   --lora_dim 128 \
   --lora_module_name "layers." \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
