#!/usr/bin/env bash
# Step 3 (critic-free RL, GRPO): a Llama-2-7b actor on GSM8K with a reward function (the final-answer match,
# no reward model, no critic) on one 80 GiB GPU (A100 / H100 class): 8 answers per prompt, KL to the
# reference as a loss term (verl's GRPO default, 0.001; no in-reward KL), prompts and answers up to 256
# tokens, bf16 (learning rate, schedule and weight decay as the PPO recipes). The memory flags are the
# memory planner's choice:
#   python -m engine.planner --actor_model llama-2-7b --num_gpus 1 --gpu_memory_gb 80 --host_memory_gb 256 --max_prompt_seq_len 256 --max_answer_seq_len 256 --advantage_estimator grpo --n_samples_per_prompt 8 --kl_ctl 0 --kl_loss_coef 0.001 --reward_funcs engine.rewards.builtin:gsm8k_answer
# planner: peak 62.0 GiB per GPU (generate 62.0, experience 52.2, actor_train 36.9); 72.0 usable; host 0.0 GiB
# Everything stays on the GPU: LoRA (rank 64, base frozen) on the actor and gradient checkpointing; the
# 16 prompts x 8 answers of a generation batch hold a 32 GiB KV cache, so the hybrid mode's folded copy
# of the LoRA-targeted weights (12.5 GiB) does not fit beside it and generation runs on the LoRA model.
# DATA_PATH is a folder with GSM8K's train.parquet and test.parquet (fields question, answer); see
# docs/data.md. The default actor is the folder step1_sft/training_scripts/llama2/run_llama2_7b.sh writes.
#
# Usage: run_llama2_7b_grpo_lora_1x80gb.sh [ACTOR_MODEL_PATH=./output_step1_llama2_7b] [DATA_PATH=./gsm8k]
#                                          [OUTPUT=./output_step3_llama2_7b_grpo_lora_1x80gb] [main.py flags...]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-./output_step1_llama2_7b}
DATA_PATH=${2:-./gsm8k}
OUTPUT=${3:-./output_step3_llama2_7b_grpo_lora_1x80gb}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 "$ROOT/step3_rlhf/main.py" \
   --data_path "$DATA_PATH" \
   --data_split 0,0,1 \
   --prompt_column_map question=prompt \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --advantage_estimator grpo \
   --n_samples_per_prompt 8 \
   --reward_funcs engine.rewards.builtin:gsm8k_answer \
   --kl_ctl 0 \
   --kl_loss_coef 0.001 \
   --actor_learning_rate 9.65e-6 \
   --actor_weight_decay 0.1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 100 \
   --num_train_epochs 1 \
   --ppo_epochs 1 \
   --seed 1234 \
   --actor_gradient_checkpointing \
   --actor_lora_dim 64 \
   --only_optimize_lora \
   --per_device_generation_batch_size 16 \
   --per_device_training_batch_size 16 \
   --dtype bf16 \
   --max_prompt_seq_len 256 \
   --max_answer_seq_len 256 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:4}" \
   2>&1 | tee "$OUTPUT/training.log"
