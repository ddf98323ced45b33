#!/usr/bin/env bash
# Step 3 (RLHF, PPO): a Llama-2-7b actor against a Llama-2-7b reward model and critic on one node of 8 x 80 GiB GPUs,
# prompts and answers up to 256 tokens, bf16, on Dahoas/rm-static (learning rates, schedule and
# weight decay as DeepSpeed-Chat's llama2 script). The memory flags are the memory planner's choice:
#   python -m engine.planner --actor_model llama-2-7b --critic_model llama-2-7b --num_gpus 8 --gpu_memory_gb 80 --host_memory_gb 1024 --max_prompt_seq_len 256 --max_answer_seq_len 256
# planner: peak 43.15 GiB per GPU (generate 43.15, experience 28.8, actor_train 42.6, critic_train 42.0); 72.0 usable; host 0.0 GiB
# Full fine-tuning of actor and critic, ZeRO-3 across the 8 GPUs, gradient checkpointing, and the
# hybrid mode, which gathers the actor once per generation batch.
# The defaults are the folders step1_sft/training_scripts/llama2/run_llama2_7b.sh and
# step2_reward/training_scripts/llama2/run_llama2_7b.sh write (run from the same folder).
#
# Usage: run_llama2_7b_8x80gb.sh [ACTOR_MODEL_PATH=./output_step1_llama2_7b] [CRITIC_MODEL_PATH=./output_step2_llama2_7b]
#                              [OUTPUT=./output_step3_llama2_7b_8x80gb] [main.py flags...]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-./output_step1_llama2_7b}
CRITIC_MODEL_PATH=${2:-./output_step2_llama2_7b}
OUTPUT=${3:-./output_step3_llama2_7b_8x80gb}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 8 "$ROOT/step3_rlhf/main.py" \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 100 \
   --num_train_epochs 1 \
   --ppo_epochs 1 \
   --seed 1234 \
   --actor_zero_stage 3 \
   --critic_zero_stage 3 \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
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
