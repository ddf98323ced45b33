#!/usr/bin/env bash
# Step 3 (RLHF, PPO): a Llama-2-7b actor trained against a Llama-2-7b reward model and critic on one
# node with 8 GPUs and ZeRO-3, with rank-64 LoRA on the Linear layers under "layers." of both the
# actor and the critic (DeepSpeed-Chat's llama2 LoRA script; otherwise as run_llama2_7b.sh:
# Dahoas/rm-static, 1 prompt / 1 sequence per GPU per batch, prompts and answers up to 256 tokens,
# actor lr 9.65e-6, critic lr 5e-6, weight decay 0.1, cosine schedule with 100 warm-up steps, actor
# dropout off, gradient checkpointing of both, reference model offloaded to CPU, hybrid-engine
# generation, fp16). As in DeepSpeed-Chat, the adapted Linear weights stay frozen, the rest of each
# model trains (at --actor_learning_rate and --critic_learning_rate) and the LoRA weights at
# --actor_lora_learning_rate and --critic_lora_learning_rate (5e-4); add --only_optimize_lora to train
# LoRA alone (the critic's value head always trains).
# The defaults are the folders step1_sft/training_scripts/llama2/run_llama2_7b_lora.sh and
# step2_reward/training_scripts/llama2/run_llama2_7b_lora.sh write by default (run from the same
# folder). --offload_reference_model needs ACTOR_ZERO_STAGE 3. --num_padding_at_beginning 1 is kept
# from DeepSpeed-Chat's script; step 3 accepts it for compatibility only (it works from real
# attention masks).
#
# Usage: run_llama2_7b_lora.sh [ACTOR_MODEL_PATH=./output_step1_llama2_7b_lora] [CRITIC_MODEL_PATH=./output_step2_llama2_7b_lora]
#                              [ACTOR_ZERO_STAGE=3] [CRITIC_ZERO_STAGE=3] [OUTPUT=./output_step3_llama2_7b_lora] [main.py flags...]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-./output_step1_llama2_7b_lora}
CRITIC_MODEL_PATH=${2:-./output_step2_llama2_7b_lora}
ACTOR_ZERO_STAGE=${3:-3}
CRITIC_ZERO_STAGE=${4:-3}
OUTPUT=${5:-./output_step3_llama2_7b_lora}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTPUT"

deepspeed "$ROOT/step3_rlhf/main.py" \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 1 \
   --per_device_generation_batch_size 1 \
   --per_device_training_batch_size 1 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --offload_reference_model \
   --actor_dropout 0.0 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --enable_hybrid_engine \
   --actor_lora_dim 64 \
   --critic_lora_dim 64 \
   --actor_lora_module_name "layers." \
   --critic_lora_module_name "layers." \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${@:6}" \
   2>&1 | tee "$OUTPUT/training.log"
