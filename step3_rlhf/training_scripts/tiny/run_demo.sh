#!/usr/bin/env bash
# Step 3 (RLHF, PPO) of the demo pipeline that `python e2e_rlhf.py` runs with no arguments: PPO on
# the bundled sorting prompts from the demo's step-1 actor and step-2 critic and reward model, with an
# EMA copy of the actor (saved as actor_ema/). 16 prompts per rank per generation batch, answers up to
# 16 tokens, 4 PPO epochs over each batch in micro-batches of 8, normalised rewards and whitened
# advantages, actor lr 1e-4, critic lr 1e-3, fp32, ZeRO stage 0: the settings under which the tiny
# actor learns the task (see the README). Step 3 trains on every training prompt (--data_split
# 0,0,1): the steps learn different things from the same prompts, and the held-out prompts it is
# evaluated on come from the eval file, which no step trains on.
# NUM_RANKS: how many ranks `deepspeed --num_gpus` starts (GPUs, or CPU processes on gloo when there is
# no GPU); empty: every GPU of the machine. Flags after the positional arguments go to main.py as they are.
#
# Usage: run_demo.sh [ACTOR_MODEL_PATH=./output/step1_sft] [CRITIC_MODEL_PATH=./output/step2_reward]
#                    [ACTOR_ZERO_STAGE=0] [CRITIC_ZERO_STAGE=0] [OUTPUT=./output/step3_rlhf] [NUM_RANKS=2]
#                    [main.py flags...]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-./output/step1_sft}
CRITIC_MODEL_PATH=${2:-./output/step2_reward}
ACTOR_ZERO_STAGE=${3:-0}
CRITIC_ZERO_STAGE=${4:-0}
OUTPUT=${5:-./output/step3_rlhf}
NUM_RANKS=${6-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LAUNCH=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "$NUM_RANKS" ]]; then
   LAUNCH+=(--num_gpus "$NUM_RANKS")
fi
mkdir -p "$OUTPUT"

deepspeed "${LAUNCH[@]}" "$ROOT/step3_rlhf/main.py" \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --data_split 0,0,1 \
   --max_prompt_seq_len 32 \
   --max_answer_seq_len 16 \
   --per_device_generation_batch_size 16 \
   --per_device_training_batch_size 8 \
   --ppo_epochs 4 \
   --normalize_reward \
   --whiten_advantages \
   --actor_learning_rate 1e-4 \
   --critic_learning_rate 1e-3 \
   --num_warmup_steps 0 \
   --enable_ema \
   --eval_interval 10 \
   --eval_prompts 400 \
   --dtype fp32 \
   --seed 1234 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:7}" \
   2>&1 | tee "$OUTPUT/training.log"
