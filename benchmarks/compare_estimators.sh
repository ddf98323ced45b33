#!/usr/bin/env bash
# PPO (with a critic) against the critic-free GRPO, RLOO and ReMax on the same shapes and settings, with
# benchmarks/rlhf_step.py: one run per estimator, then their figures side by side as JSON (printed, and
# written to OUT_DIR/compare.json) and as a Markdown table (OUT_DIR/compare.md).
#
# Every run holds the same reference and reward model (the critic's folder): PPO adds the critic, the
# critic-free runs add benchmarks/length_reward.py as a second scorer (random text passes no rule; its length
# differs between the answers of a group). Every run generates ROWS answers per generation batch per rank
# and trains on them in micro-batches of ROWS: PPO and ReMax from ROWS prompts, GRPO and RLOO from
# ROWS / N prompts with N answers each (ReMax also decodes one greedy answer per prompt for its baseline).
#
# Usage: benchmarks/compare_estimators.sh OUT_DIR [NUM_RANKS=1] [rlhf_step.py flags (shape, lengths, steps)...]
# Environment: ROWS (8), N (4), STEP3_FLAGS (step-3 flags for every run, e.g. ZeRO stages), ESTIMATORS
# ("ppo grpo rloo remax"). A scaled-down Llama-2-7B on 2 CPU ranks, ZeRO-3 + hybrid:
#   MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 \
#   STEP3_FLAGS="--actor_zero_stage 3 --critic_zero_stage 3 --enable_hybrid_engine" \
#   benchmarks/compare_estimators.sh out/estimators 2 --actor_model llama-2-7b --num_layers 2 --hidden_size 256 \
#       --intermediate_size 688 --num_heads 4 --max_prompt_seq_len 64 --max_answer_seq_len 64 --steps 3
set -euo pipefail

OUT_DIR=${1:?usage: compare_estimators.sh OUT_DIR [NUM_RANKS] [rlhf_step.py flags...]}
NUM_RANKS=${2:-1}
ROWS=${ROWS:-8}
N=${N:-4}
ESTIMATORS=${ESTIMATORS:-ppo grpo rloo remax}
read -r -a COMMON <<< "${STEP3_FLAGS:-}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LENGTH="$ROOT/benchmarks/length_reward.py:answer_length"
if (( ROWS % N != 0 )); then
  echo "compare_estimators.sh: ROWS ($ROWS) must be a multiple of N ($N) so every run trains on ROWS answers" >&2
  exit 2
fi
if (( NUM_RANKS > 1 )); then
  LAUNCH=(deepspeed --num_gpus "$NUM_RANKS")
else
  LAUNCH=(python)
fi
mkdir -p "$OUT_DIR"

reports=()
for name in $ESTIMATORS; do
  case "$name" in
    ppo) prompts=$ROWS; algo=() ;;
    grpo|rloo) prompts=$((ROWS / N)); algo=(--advantage_estimator "$name" --n_samples_per_prompt "$N" --reward_funcs "$LENGTH") ;;
    remax) prompts=$ROWS; algo=(--advantage_estimator remax --reward_funcs "$LENGTH") ;;
    *) echo "compare_estimators.sh: unknown estimator '$name' in ESTIMATORS (ppo, grpo, rloo, remax)" >&2; exit 2 ;;
  esac
  rm -rf "$OUT_DIR/run_$name"
  "${LAUNCH[@]}" "$ROOT/benchmarks/rlhf_step.py" "${@:3}" --run_dir "$OUT_DIR/run_$name" \
      --per_device_generation_batch_size "$prompts" --per_device_training_batch_size "$ROWS" \
      --out "$OUT_DIR/$name.json" -- "${COMMON[@]}" "${algo[@]}" > "$OUT_DIR/$name.log" 2>&1 \
    || { echo "compare_estimators.sh: the $name run failed; see $OUT_DIR/$name.log" >&2; tail -5 "$OUT_DIR/$name.log" >&2; exit 1; }
  reports+=("$OUT_DIR/$name.json")
done
python "$ROOT/benchmarks/rlhf_step.py" --compare "${reports[@]}" > "$OUT_DIR/compare.md"
python "$ROOT/benchmarks/rlhf_step.py" --compare "${reports[@]}" --json | tee "$OUT_DIR/compare.json"
