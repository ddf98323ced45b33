#!/usr/bin/env bash
# Step 3 (RLHF, PPO): an OPT-1.3b actor (step-1 output) with rank-128 LoRA on its decoder layers,
# trained against an OPT-350m reward model and critic (step-2 output) on one node with 8 GPUs and
# ZeRO-2 (DeepSpeed-Chat's single_node 1.3b LoRA script: Dahoas/rm-static, 4 prompts per generation
# batch and 4 sequences per PPO micro-batch per GPU, prompts and answers up to 256 tokens each, actor
# lr 9.65e-6, critic lr 5e-6, cosine schedule with 100 warm-up steps, actor dropout off,
# hybrid-engine generation, fp16). As in DeepSpeed-Chat the adapted weights stay frozen.
# CRITIC_MODEL_PATH must be a reward model in Hugging Face *ForSequenceClassification form (one
# label), as step2_reward/main.py writes it. --num_padding_at_beginning is accepted for
# compatibility only (step 3 works from real attention masks).
#
# Usage: run_1.3b_lora.sh ACTOR_MODEL_PATH CRITIC_MODEL_PATH [ACTOR_ZERO_STAGE=2] [CRITIC_ZERO_STAGE=2] [OUTPUT=./output] [main.py flags...]
set -euo pipefail

USAGE="usage: run_1.3b_lora.sh ACTOR_MODEL_PATH CRITIC_MODEL_PATH [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]"
ACTOR_MODEL_PATH=${1:?$USAGE}
CRITIC_MODEL_PATH=${2:?$USAGE}
ACTOR_ZERO_STAGE=${3:-2}
CRITIC_ZERO_STAGE=${4:-2}
OUTPUT=${5:-./output}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step3_rlhf/main.py" \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 1 \
   --per_device_generation_batch_size 4 \
   --per_device_training_batch_size 4 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --actor_dropout 0.0 \
   --actor_lora_dim 128 \
   --enable_hybrid_engine \
   --actor_lora_module_name decoder.layers. \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:6}" \
   2>&1 | tee "$OUTPUT/training.log"
