"""The memory planner: will this RLHF run fit, and with which settings? (`python -m engine.planner`)

- `shapes`: the model side of a plan: shipped configs (Llama-2 7B/13B/70B, OPT 350m to 66B,
  Qwen2.5-7B; config JSON, no weights) or any Hugging Face folder, with exact parameter, largest-layer,
  LoRA and KV-cache widths read from the model built on the meta device.
- `model_states`: bytes per rank of parameters, gradients and optimizer states of trained and frozen
  roles for each ZeRO stage, offload choice, dtype and 8/4-bit quantization, cross-checked against
  DeepSpeed's estimators and against bitsandbytes models.
- `activations`: KV cache, activations (with and without gradient checkpointing) and logits per phase.
- `plan`: per-phase peaks of a step-3 run and the search for the cheapest settings that fit (its candidates
  pruned by the step-3 config's own checks).
- `step3`: the same for a parsed `Step3Config`: its knobs, workload and prediction, and step 3's `--auto_fit`.
- `dpo`: the DPO step's phases (reference log-probs, training on 2x the micro-batch), its three reference modes
  (a frozen copy, LoRA adapters off, precomputed), its search, and `plan_dpo` for the DPO main's `--auto_fit`;
  `dpo_cli` is `python -m engine.planner --step dpo`.
"""
