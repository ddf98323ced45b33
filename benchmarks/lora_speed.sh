#!/usr/bin/env bash
# LoRA against no LoRA in step 3, the workload of issue 18's side-by-side with DeepSpeed-Chat: 2 CPU ranks,
# ZeRO-3 (actor and critic), bf16, 8 prompts per rank, 24 prompt + 16 answer tokens, greedy, 26 PPO steps,
# actor LoRA 0 and 8, hybrid generation off and on, on the built-in tiny model (random weights).
#
#   benchmarks/lora_speed.sh [OUT_DIR] [ROUNDS]      # default output/lora_speed, 1 round
#   VARIANTS="new:$PWD old:/tmp/old-checkout" benchmarks/lora_speed.sh out 2   # A/B of two checkouts
#
# Runs are interleaved (round, hybrid, LoRA, variant) so that a shared machine's load falls on all of them.
# Each run writes OUT_DIR/<variant>_r<round>_h<hybrid>_l<lora>.json (benchmarks/rlhf_step.py's report, with
# per-phase time per step, first-step time, launch-to-first-step time and peak RSS per rank); the summary
# (OUT_DIR/summary.json and summary.md) gives each figure's median over the rounds and LoRA's ratio to no
# LoRA. Environment: STEPS (26), WARMUP (1), LORA_DIMS ("0 8"), HYBRID ("0 1"), VARIANTS ("this:<repo>"),
# SHAPE (extra benchmarks/rlhf_step.py flags, e.g. "--hidden_size 512 --intermediate_size 1536 --num_heads 8"
# for a wider model than the built-in tiny one), FLAGS_<variant> (extra benchmarks/rlhf_step.py flags for that
# variant alone). LoRA's arithmetic against its structure, one checkout:
#   VARIANTS="real:$PWD nomath:$PWD" FLAGS_nomath=--no_lora_arithmetic benchmarks/lora_speed.sh out 2
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-output/lora_speed}"
ROUNDS="${2:-1}"
STEPS="${STEPS:-26}"
WARMUP="${WARMUP:-1}"
LORA_DIMS="${LORA_DIMS:-0 8}"
HYBRID="${HYBRID:-0 1}"
VARIANTS="${VARIANTS:-this:$ROOT}"
read -r -a SHAPE_ARGS <<< "${SHAPE:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}"

for round in $(seq 1 "$ROUNDS"); do
  for hybrid in $HYBRID; do
    for lora in $LORA_DIMS; do
      for variant in $VARIANTS; do
        name="${variant%%:*}" repo="${variant#*:}"
        flags_var="FLAGS_$name"
        read -r -a variant_args <<< "${!flags_var:-}"
        tag="${name}_r${round}_h${hybrid}_l${lora}"
        flags=(--actor_zero_stage 3 --critic_zero_stage 3 --no-do_sample --actor_lora_dim "$lora")
        [ "$hybrid" = 1 ] && flags+=(--enable_hybrid_engine)
        echo "== $tag" >&2
        # Launch time taken here, before the launcher, so that launch-to-first-step includes it.
        (cd "$repo" && RLHF_BENCH_LAUNCH_TIME="$(date +%s.%N)" PYTHONPATH="$repo" \
          deepspeed --num_gpus 2 benchmarks/rlhf_step.py --actor_model tiny --dtype bf16 \
          --max_prompt_seq_len 24 --max_answer_seq_len 16 --per_device_generation_batch_size 8 \
          --per_device_training_batch_size 8 --steps "$STEPS" --warmup_steps "$WARMUP" ${SHAPE_ARGS[@]+"${SHAPE_ARGS[@]}"} \
          ${variant_args[@]+"${variant_args[@]}"} \
          --run_dir "$OUT/run_$tag" --out "$OUT/$tag.json" -- "${flags[@]}" > "$OUT/$tag.log" 2>&1)
      done
    done
  done
done
python "$ROOT/benchmarks/lora_speed_summary.py" "$OUT"
