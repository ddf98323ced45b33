#!/usr/bin/env bash
# DeepSpeed-Chat's own step 3 against ours, per PPO step, with actor LoRA rank 0 and 8 (issue 18's side-by-side).
#
#   DSCHAT=/path/to/DeepSpeedExamples benchmarks/dschat_side_by_side.sh OUT_DIR [ROUNDS]   # default 2 rounds
#
# Equal on both sides: 2 CPU ranks (gloo), OMP_NUM_THREADS=1, MALLOC_MMAP_THRESHOLD_=65536; the same random-weight
# tiny Llama actor and critic (benchmarks/rlhf_step.py's, seed 1234, bf16); actor and critic ZeRO-3 with the
# same DeepSpeed config values; 8 prompts per rank from our bundled prompt set, left-padded to 24 tokens;
# greedy generation of 16 tokens (ZeRO-3 module, synced_gpus, no hybrid engine); one PPO epoch of one
# 8-row micro-batch; no gradient checkpointing; LoRA on every Linear of the decoder layers ('layers.'),
# scaling 1/rank; critic without LoRA; optimizer torch.optim.AdamW for actor and critic (ours takes it on CPU;
# DeepSpeed-Chat's FusedAdam is CUDA-only and is swapped for it); 26 steps, the first left out.
# LoRA trains the same weights on both sides: the adapters, not the adapted Linear weights, and the rest of
# the model (no --only_optimize_lora).
# Differs: each side's own code (LoRA layer, PPO math, reward end-score loop, peft vs DeepSpeed-Chat's
# LinearLayer_LoRA); DeepSpeed-Chat pads the vocabulary to 288 rows (ours 285) and pads with EOS (ours <pad>).
# benchmarks/dschat_shim.py lists the runtime shims and defines the phases.
#
# Writes DSCHAT/applications/DeepSpeed-Chat/data/{train,eval}.json (its local/jsonfile dataset), and in OUT_DIR:
# models/ (DeepSpeed-Chat-format folders), <variant>_r<round>_l<lora>.json and .log per run, summary.json with
# per config the median over rounds of the mean step seconds (e2e and generate / experience / train), the
# LoRA/no-LoRA ratios and ours/DeepSpeed-Chat per LoRA setting (ratios of those medians, and per round).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:?usage: DSCHAT=/path/to/DeepSpeedExamples $0 OUT_DIR [ROUNDS]}"
ROUNDS="${2:-2}"
APP="${DSCHAT:?set DSCHAT to a DeepSpeedExamples checkout}/applications/DeepSpeed-Chat"
STEPS=26
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH="$ROOT"
cut -d' ' -f1-3 /proc/loadavg > "$OUT/loadavg_start"
python "$ROOT/benchmarks/dschat_shim.py" prepare "$OUT" "$APP"
shape=(--max_prompt_seq_len 24 --max_answer_seq_len 16 --per_device_generation_batch_size 8
       --per_device_training_batch_size 8)

run() {  # variant round lora
  local tag="$1_r$2_l$3"
  echo "== $tag" >&2
  if [ "$1" = ours ]; then
    deepspeed --num_gpus 2 "$ROOT/benchmarks/rlhf_step.py" --actor_model tiny --dtype bf16 "${shape[@]}" \
      --steps "$STEPS" --warmup_steps 1 --run_dir "$OUT/run_$tag" --out "$OUT/$tag.json" \
      -- --actor_zero_stage 3 --critic_zero_stage 3 --no-do_sample --actor_lora_dim "$3"
  else
    DSCHAT_APP="$APP" DSCHAT_TIMING_OUT="$OUT/$tag.json" \
      deepspeed --num_gpus 2 "$ROOT/benchmarks/dschat_shim.py" --data_path local/jsonfile --data_split 0,0,1 \
      --data_output_path "$OUT/dschat_data_cache" --actor_model_name_or_path "$OUT/models/actor" \
      --critic_model_name_or_path "$OUT/models/critic" --num_padding_at_beginning 0 "${shape[@]}" \
      --actor_zero_stage 3 --critic_zero_stage 3 --dtype bf16 --actor_lora_dim "$3" \
      --actor_lora_module_name layers. --enable_test_mode --test_stop_step "$STEPS" --seed 1234
  fi > "$OUT/$tag.log" 2>&1
}

for round in $(seq 1 "$ROUNDS"); do
  for config in dschat:0 ours:0 dschat:8 ours:8; do
    run "${config%:*}" "$round" "${config#*:}"
  done
done

python - "$OUT" "$ROUNDS" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
PHASES = ("generate_s", "experience_s", "train_s")


def step_means(path):
    """Mean seconds per measured step: e2e and per phase, and the mean answer length."""
    report = json.loads(path.read_text())
    if "time" not in report:  # dschat_shim.py's timing: every step, the first is dropped here
        steps = report["steps"][1:]
        mean = {k: statistics.mean(s[k] for s in steps) for k in ("e2e_s", *PHASES, "answer_len")}
        return mean | {"steps": len(steps)}
    seconds = report["time"]["seconds"]  # rlhf_step.py's report: warmup already dropped
    return {"e2e_s": report["time"]["e2e_s"], **{f"{p}_s": seconds[p] for p in ("generate", "experience", "train")},
            "answer_len": statistics.mean(r["rollout/response_len"] for r in report["per_step"][1:]),
            "steps": report["steps"]["measured"]}


configs = ("dschat_l0", "dschat_l8", "ours_l0", "ours_l8")
runs = {c: [step_means(out / f"{c.rsplit('_', 1)[0]}_r{r}_{c.rsplit('_', 1)[1]}.json") for r in range(1, rounds + 1)]
        for c in configs}
median = {c: {k: statistics.median(run[k] for run in rs) for k in rs[0]} | {"e2e_s_per_round": [r["e2e_s"] for r in rs]}
          for c, rs in runs.items()}
pairs = {"dschat_lora8_over_lora0": ("dschat_l8", "dschat_l0"),
         "ours_lora8_over_lora0": ("ours_l8", "ours_l0"),
         "ours_over_dschat_lora0": ("ours_l0", "dschat_l0"),
         "ours_over_dschat_lora8": ("ours_l8", "dschat_l8")}
ratios = {name: {"of_medians": median[a]["e2e_s"] / median[b]["e2e_s"],
                 "per_round": [ra["e2e_s"] / rb["e2e_s"] for ra, rb in zip(runs[a], runs[b])]}
          for name, (a, b) in pairs.items()}
summary = {"rounds": rounds, "loadavg_at_start": (out / "loadavg_start").read_text().split(),
           "median_step_seconds": median, "ratios_e2e": ratios}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'config':22}{'e2e_s':>8}{'gen_s':>8}{'exp_s':>8}{'train_s':>8}{'ans_len':>8}")
for c, m in median.items():
    print(f"{c:22}" + "".join(f"{m[k]:8.3f}" for k in ("e2e_s", *PHASES)) + f"{m['answer_len']:8.2f}")
for name, r in ratios.items():
    print(f"{name:34}{r['of_medians']:.3f}  per round {', '.join(f'{x:.3f}' for x in r['per_round'])}")
EOF
