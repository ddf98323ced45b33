#!/usr/bin/env bash
# Step 3 (critic-free RL, GRPO): full fine-tuning of a Llama-2-7b actor on GSM8K with a reward function (the
# final-answer match, no reward model, no critic) on one node of 8 x 80 GiB GPUs: 8 answers per prompt, KL
# to the reference as a loss term (verl's GRPO default, 0.001; no in-reward KL), prompts and answers up to
# 256 tokens, bf16 (learning rate, schedule and weight decay as the PPO recipes). The memory flags are the
# memory planner's choice:
#   python -m engine.planner --actor_model llama-2-7b --num_gpus 8 --gpu_memory_gb 80 --host_memory_gb 1024 --max_prompt_seq_len 256 --max_answer_seq_len 256 --advantage_estimator grpo --n_samples_per_prompt 8 --kl_ctl 0 --kl_loss_coef 0.001 --reward_funcs engine.rewards.builtin:gsm8k_answer
# planner: peak 68.0 GiB per GPU (generate 59.8, experience 19.9, actor_train 68.0); 72.0 usable; host 0.0 GiB
# Full fine-tuning under ZeRO-3 across the 8 GPUs and the hybrid mode, which gathers the actor once per
# generation batch; without a critic the actor trains without gradient checkpointing (the PPO recipe on the
# same GPUs needs it), at 68.0 of 72 usable GiB: add --actor_gradient_checkpointing if a GPU runs short.
# --critic_zero_stage 3 only places the (absent) reward model: the planner keeps both stages equal.
# DATA_PATH is a folder with GSM8K's train.parquet and test.parquet (fields question, answer); see
# docs/data.md. The default actor is the folder step1_sft/training_scripts/llama2/run_llama2_7b.sh writes.
#
# Usage: run_llama2_7b_grpo_full_8x80gb.sh [ACTOR_MODEL_PATH=./output_step1_llama2_7b] [DATA_PATH=./gsm8k]
#                                          [OUTPUT=./output_step3_llama2_7b_grpo_full_8x80gb] [main.py flags...]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-./output_step1_llama2_7b}
DATA_PATH=${2:-./gsm8k}
OUTPUT=${3:-./output_step3_llama2_7b_grpo_full_8x80gb}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 8 "$ROOT/step3_rlhf/main.py" \
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
   --actor_zero_stage 3 \
   --critic_zero_stage 3 \
   --enable_hybrid_engine \
   --per_device_generation_batch_size 16 \
   --per_device_training_batch_size 16 \
   --dtype bf16 \
   --max_prompt_seq_len 256 \
   --max_answer_seq_len 256 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:4}" \
   2>&1 | tee "$OUTPUT/training.log"
