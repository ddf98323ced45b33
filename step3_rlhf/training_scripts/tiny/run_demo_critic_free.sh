#!/usr/bin/env bash
# Step 3 of the demo pipeline with a critic-free estimator (`python e2e_rlhf.py --algorithm grpo`): the step-1
# actor learns the bundled sorting task from its rule (engine.rewards.builtin:sort_rule) as the reward, so no
# reward model or critic is built; no KL term either (--kl_ctl 0), so no reference. Eight sampled answers per
# prompt, one update per rollout.
#
# Usage: bash run_demo_critic_free.sh [ACTOR] [ESTIMATOR] [ACTOR_ZERO] [OUTPUT] [NUM_RANKS] [extra step-3 flags...]
#   ESTIMATOR: grpo (default), dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline or remax
#   NUM_RANKS: ranks for --num_gpus (default 2: two CPU ranks or two GPUs); "" = every GPU of the machine
set -euo pipefail

ACTOR_MODEL_PATH=${1:-./output/step1_sft}
ESTIMATOR=${2:-grpo}
ACTOR_ZERO_STAGE=${3:-0}
OUTPUT=${4:-./output/step3_$ESTIMATOR}
NUM_RANKS=${5-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LAUNCH=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "$NUM_RANKS" ]]; then
   LAUNCH+=(--num_gpus "$NUM_RANKS")
fi
mkdir -p "$OUTPUT"

deepspeed "${LAUNCH[@]}" "$ROOT/step3_rlhf/main.py" \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --advantage_estimator "$ESTIMATOR" \
   --n_samples_per_prompt 8 \
   --reward_funcs engine.rewards.builtin:sort_rule \
   --kl_ctl 0 \
   --data_split 0,0,1 \
   --max_prompt_seq_len 32 \
   --max_answer_seq_len 16 \
   --per_device_generation_batch_size 8 \
   --per_device_training_batch_size 32 \
   --ppo_epochs 1 \
   --actor_learning_rate 3e-4 \
   --num_warmup_steps 0 \
   --eval_interval 25 \
   --eval_prompts 400 \
   --dtype fp32 \
   --seed 1234 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:6}" \
   2>&1 | tee "$OUTPUT/training.log"
