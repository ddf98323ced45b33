#!/usr/bin/env bash
# Step 1 (SFT): LoRA fine-tuning of meta-llama/Llama-2-7b-hf on one node with 8 GPUs, ZeRO-3 and
# gradient checkpointing: rank-128 LoRA on the Linear layers under "layers.", 4 Dahoas/yitingxie
# datasets, 4 epochs, micro batch 4 per GPU. As in DeepSpeed-Chat's script, the adapted Linear weights
# stay frozen, the rest of the model (embeddings, norms, head) trains at --learning_rate (9.65e-6) and
# the LoRA weights at --lora_learning_rate (5e-4); pass --only_optimize_lora to train the LoRA weights
# alone. The model is gated on the Hugging Face hub: accept its licence and log in first.
#
# Usage: run_llama2_7b_lora.sh [OUTPUT=./output_step1_llama2_7b_lora] [ZERO_STAGE=3] [main.py flags...]
set -euo pipefail

OUTPUT=${1:-./output_step1_llama2_7b_lora}
ZERO_STAGE=${2:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step1_sft/main.py" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.0 \
   --num_train_epochs 4 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --lora_dim 128 \
   --lora_module_name "layers." \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:3}" \
   2>&1 | tee "$OUTPUT/training.log"
