#!/usr/bin/env bash
# Step 3 (RLHF, PPO): a quick end-to-end check on a CPU-only machine (no GPU needed): 2 CPU ranks
# run PPO on the bundled synthetic sorting prompts (no --data_path) with ZeRO-3, hybrid-engine
# generation, rank-8 LoRA on actor and critic, an EMA copy of the actor (saved as actor_ema/) and
# bf16 (DeepSpeed cannot run fp16 on a CPU). Prompts up to 32 tokens, answers up to 16, 16 prompts
# per generation batch per rank, 4 PPO epochs over each batch with normalised rewards and whitened
# advantages (the settings under which the tiny actor learns the task; see the README).
# ACTOR is the folder step1_sft/training_scripts/tiny/run_cpu.sh writes and CRITIC the one
# step2_reward/training_scripts/tiny/run_cpu.sh writes (both default to where those scripts write by
# default; run all three from the same folder). Both come from the built-in tiny model, so they share
# its tokenizer, as step 3 requires.
# Note the order of the arguments: model folders first, then OUTPUT, then the ZeRO stage of both roles.
#
# Usage: run_cpu.sh [ACTOR=./output_step1_tiny] [CRITIC=./output_step2_tiny] [OUTPUT=./output_step3_tiny] [ZERO=3] [main.py flags...]
set -euo pipefail

ACTOR=${1:-./output_step1_tiny}
CRITIC=${2:-./output_step2_tiny}
OUTPUT=${3:-./output_step3_tiny}
ZERO=${4:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed --num_gpus 2 "$ROOT/step3_rlhf/main.py" \
   --actor_model_name_or_path "$ACTOR" \
   --critic_model_name_or_path "$CRITIC" \
   --actor_zero_stage "$ZERO" \
   --critic_zero_stage "$ZERO" \
   --enable_hybrid_engine \
   --actor_lora_dim 8 \
   --critic_lora_dim 8 \
   --enable_ema \
   --dtype bf16 \
   --max_prompt_seq_len 32 \
   --max_answer_seq_len 16 \
   --per_device_generation_batch_size 16 \
   --per_device_training_batch_size 8 \
   --ppo_epochs 4 \
   --normalize_reward \
   --whiten_advantages \
   --eval_interval 10 \
   --actor_learning_rate 1e-4 \
   --critic_learning_rate 1e-3 \
   --num_warmup_steps 0 \
   --seed 1234 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:5}" \
   2>&1 | tee "$OUTPUT/training.log"
