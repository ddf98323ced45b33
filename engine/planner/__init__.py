"""The memory planner (issue 6, in progress): will this RLHF run fit, and with which settings?

Built so far: `shapes`, the model side of the plan: shipped configs (Llama-2 7B/13B/70B, OPT 350m to
66B, Qwen2.5-7B; config JSON, no weights) or any Hugging Face folder, with exact parameter, largest-layer
and LoRA counts read from the model built on the meta device.
"""
