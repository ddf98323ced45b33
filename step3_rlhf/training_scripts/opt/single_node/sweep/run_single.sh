#!/usr/bin/env bash
# Step 3 (RLHF, PPO) sweep point on one node: the actor and critic given, the ZeRO stages, hybrid-engine
# generation, CPU offload, rank-128 actor LoRA, MixZ++ (--enable_mixed_precision_lora, CUDA only) and a
# test-mode stop chosen by the arguments, as DeepSpeed-Chat's step-3 sweep point (Dahoas/rm-static,
# 4 prompts per generation batch and 4 sequences per PPO micro-batch per GPU, prompts and answers up
# to 256 tokens each, actor lr 9.65e-6, critic lr 5e-6, cosine schedule with 100 warm-up steps, actor
# dropout off, answers printed, fp16). run_step3_sweep.sh calls it once per combination.
# CRITIC_MODEL_PATH must be a reward model in Hugging Face *ForSequenceClassification form (one
# label), as step2_reward/main.py writes it. --num_padding_at_beginning is accepted for
# compatibility only (step 3 works from real attention masks).
#
# Usage: run_single.sh ACTOR_MODEL_PATH CRITIC_MODEL_PATH [ACTOR_ZERO_STAGE=2] [CRITIC_ZERO_STAGE=2]
#                      [HYBRID_ENGINE=false] [OFFLOAD=false] [LORA=false] [MIXED_PRECISION_LORA=false]
#                      [OUTPUT=./output] [TEST=false] [TEST_STOP_STEP=5] [main.py flags...]
set -euo pipefail

USAGE="usage: run_single.sh ACTOR_MODEL_PATH CRITIC_MODEL_PATH [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [HYBRID_ENGINE] [OFFLOAD] [LORA] [MIXED_PRECISION_LORA] [OUTPUT] [TEST] [TEST_STOP_STEP]"
ACTOR_MODEL_PATH=${1:?$USAGE}
CRITIC_MODEL_PATH=${2:?$USAGE}
ACTOR_ZERO_STAGE=${3:-2}
CRITIC_ZERO_STAGE=${4:-2}
HYBRID_ENGINE=${5:-false}
OFFLOAD=${6:-false}
LORA=${7:-false}
MIXED_PRECISION_LORA=${8:-false}
OUTPUT=${9:-./output}
TEST=${10:-false}
TEST_STOP_STEP=${11:-5}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OPTIONAL=()
if [[ "$HYBRID_ENGINE" == true ]]; then
   OPTIONAL+=(--enable_hybrid_engine)
fi
if [[ "$OFFLOAD" == true ]]; then
   OPTIONAL+=(--offload)
fi
if [[ "$LORA" == true ]]; then
   OPTIONAL+=(--actor_lora_dim 128 --actor_lora_module_name decoder.layers.)
fi
if [[ "$MIXED_PRECISION_LORA" == true ]]; then
   OPTIONAL+=(--enable_mixed_precision_lora)
fi
if [[ "$TEST" == true ]]; then
   OPTIONAL+=(--enable_test_mode --test_stop_step "$TEST_STOP_STEP")
fi
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
   --actor_weight_decay 0.0 \
   --critic_weight_decay 0.0 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --actor_dropout 0.0 \
   --print_answers \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "${OPTIONAL[@]}" \
   "${@:12}" \
   2>&1 | tee "$OUTPUT/training.log"
