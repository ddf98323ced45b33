#!/usr/bin/env bash
# Step 3 (RLHF, PPO) sweep, as DeepSpeed-Chat's: run_single.sh for ZeRO-2 and ZeRO-3 (actor and critic
# alike), each with and without the hybrid engine, CPU offload and actor LoRA (16 runs), then MixZ++
# (ZeRO-3, LoRA, no offload) with and without the hybrid engine (2 runs). Each run goes into
# ./<its settings>/; a failed run is reported and the sweep goes on, and the exit status is 1 if any
# failed. MixZ++ needs CUDA GPUs (on a CPU it is accepted with a warning and does nothing).
#
# Usage: run_step3_sweep.sh [ACTOR_MODEL_PATH=AdamG012/chat-opt-1.3b-sft-deepspeed]
#                           [CRITIC_MODEL_PATH=AdamG012/chat-opt-350m-reward-deepspeed]
set -euo pipefail

ACTOR_MODEL_PATH=${1:-AdamG012/chat-opt-1.3b-sft-deepspeed}
CRITIC_MODEL_PATH=${2:-AdamG012/chat-opt-350m-reward-deepspeed}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
failed=()

point() {  # ZERO_STAGE HYBRID_ENGINE OFFLOAD LORA MIXED_PRECISION_LORA NAME
   echo "=== $6"
   bash "$HERE/run_single.sh" "$ACTOR_MODEL_PATH" "$CRITIC_MODEL_PATH" "$1" "$1" "$2" "$3" "$4" "$5" "$6" \
      || failed+=("$6")
}

for z in 2 3; do
   for he in true false; do
      for offload in true false; do
         for lora in true false; do
            point "$z" "$he" "$offload" "$lora" false "z${z}_he_${he}_offload_${offload}_lora_${lora}"
         done
      done
   done
done
for he in true false; do
   point 3 "$he" false true true "z3_he_${he}_offload_false_lora_true_mpl_true"
done
if (( ${#failed[@]} )); then
   echo "failed: ${failed[*]}"
   exit 1
fi
