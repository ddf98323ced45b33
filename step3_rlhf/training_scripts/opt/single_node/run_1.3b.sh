#!/usr/bin/env bash
# Step 3 (RLHF, PPO): full fine-tuning of an OPT-1.3b actor against an OPT-350m reward model and
# critic on one node with 8 GPUs and ZeRO-2 (DeepSpeed-Chat's single_node script: Dahoas/rm-static,
# 4 prompts per generation batch and 4 sequences per PPO micro-batch per GPU, prompts and answers up
# to 256 tokens each, actor lr 9.65e-6, critic lr 5e-6, cosine schedule with 100 warm-up steps,
# actor dropout off, hybrid-engine generation, an EMA copy of the actor saved as actor_ema/, fp16).
# Without model paths it starts from the checkpoints DeepSpeed-Chat's script defaults to:
# AdamG012/chat-opt-1.3b-sft-deepspeed (actor) and AdamG012/chat-opt-350m-reward-deepspeed (critic).
# The engine checks before training that the critic is a Hugging Face *ForSequenceClassification
# folder with one label (what step2_reward/main.py writes) and stops, naming the flag, if not; a
# reward model saved in DeepSpeed-Chat's own layout can fail that check: pass your step-2 output then.
# --num_padding_at_beginning is accepted for compatibility only (step 3 works from real attention
# masks). TensorBoard events go to $OUTPUT/ds_tensorboard_logs/step3_model_tensorboard, as in
# DeepSpeed-Chat's "--tensorboard_path $OUTPUT".
#
# Usage: run_1.3b.sh [ACTOR_MODEL_PATH=AdamG012/chat-opt-1.3b-sft-deepspeed]
#                    [CRITIC_MODEL_PATH=AdamG012/chat-opt-350m-reward-deepspeed]
#                    [ACTOR_ZERO_STAGE=2] [CRITIC_ZERO_STAGE=2] [OUTPUT=./output] [main.py flags...]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-AdamG012/chat-opt-1.3b-sft-deepspeed}
CRITIC_MODEL_PATH=${2:-AdamG012/chat-opt-350m-reward-deepspeed}
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
   --actor_dropout 0.0 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --enable_hybrid_engine \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --enable_ema \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:6}" \
   2>&1 | tee "$OUTPUT/training.log"
