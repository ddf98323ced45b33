"""Typed configs built from shared parts, with CLI flags generated from the fields.

Each step's config is a dataclass whose fields are parts (`ModelArgs`, `DataArgs`, ...). Every leaf
field is one flag with the same name (DeepSpeed-Chat's flat names: `--zero_stage`, `--lora_dim`);
its help text lives once, next to the field. Precedence: field default < `--config file.yaml` <
command-line flag. Unknown keys and contradictory settings raise `UserError`; nothing is rewritten
after parsing.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from engine.errors import UserError

C = TypeVar("C")


def arg(default: Any = None, help: str = "", choices: Sequence[Any] | None = None,
        default_factory: Any = None) -> Any:
    """A config field: its default, its help text and, optionally, the allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _cuda_available() -> bool:
    from engine.runtime.distributed import gpu_wanted

    return gpu_wanted()


def default_dtype() -> str:
    """DeepSpeed-Chat defaults to fp16, which DeepSpeed cannot run on a CPU; bf16 can."""
    return "fp16" if _cuda_available() else "bf16"


# ----------------------------------------------------------------------------------------------
# Shared parts
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    model_name_or_path: str | None = arg(
        None, "Hugging Face model folder or hub name. Default: the built-in tiny Llama model "
        "(random weights from a fixed seed), made on first use.")
    dropout: float | None = arg(
        None, "Set every dropout probability in the model config to this value (None keeps the model's).")
    attn_implementation: str = arg(
        "sdpa", "Attention kernel. flash_attention_2 needs the flash-attn package (a GPU extra).",
        choices=("sdpa", "eager", "flash_attention_2"))
    trust_remote_code: bool = arg(
        False, "Allow model/tokenizer code from the model folder or hub to run. Off: only built-in "
        "transformers architectures load.")


@dataclass
class DataArgs:
    data_path: list[str] = arg(
        default_factory=list, help="Datasets: DeepSpeed-Chat hub names (e.g. Dahoas/rm-static), "
        "local/jsonfile, a .json/.jsonl/.parquet file, or a folder with train.* and eval.* files. "
        "Several are concatenated. Default: the bundled synthetic sorting task.")
    data_split: str = arg(
        "2,4,4", "Comma-separated weights of the slices given to steps 1, 2 and 3 (disjoint, seeded).")
    sft_only_data_path: list[str] = arg(
        default_factory=list, help="Datasets used whole by step 1 only (not split between steps).")
    data_output_path: str | None = arg(
        None, "Folder for the tokenized cache. Default: <output_dir>/data_cache (DeepSpeed-Chat "
        "uses /tmp/data_files, a shared world-writable folder; we do not).")
    max_seq_len: int = arg(512, "Maximum tokens per training sequence (prompt + answer).")
    train_on_prompt: bool = arg(
        False, "Also put loss on the prompt tokens, as DeepSpeed-Chat does. Default: loss on the "
        "answer tokens only (as TRL and OpenRLHF do), so the model is not trained to write prompts.")
    overlength: str = arg(
        "truncate", "What to do with rows longer than --max_seq_len: truncate them (DeepSpeed-Chat's "
        "behaviour) or drop them. Either way the count is logged.", choices=("truncate", "drop"))
    add_eot_token: bool = arg(
        False, "Add --eot_token to the tokenizer as a special token and end every answer with it.")
    eot_token: str = arg("<|endoftext|>", "The end-of-text token used with --add_eot_token.")


@dataclass
class TrainArgs:
    per_device_train_batch_size: int = arg(16, "Micro-batch size per rank for training.")
    per_device_eval_batch_size: int = arg(16, "Batch size per rank for evaluation.")
    learning_rate: float = arg(1e-3, "Peak learning rate (DeepSpeed-Chat's step-1 default).")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    num_train_epochs: int = arg(1, "Number of passes over the training slice.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    lr_scheduler_type: str = arg(
        "cosine", "Learning-rate schedule (transformers' get_scheduler).",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup"))
    num_warmup_steps: int = arg(0, "Warm-up optimizer steps of the schedule.")
    adam_beta1: float = arg(0.9, "Adam beta1 (DeepSpeed-Chat: 0.9).")
    adam_beta2: float = arg(0.95, "Adam beta2 (DeepSpeed-Chat: 0.95).")
    seed: int = arg(1234, "Seed of the data split, shuffling, dropout and the built-in model.")
    test_stop_step: int = arg(
        0, "Stop after this many optimizer steps without changing the schedule (0: run to the end). "
        "For tests and quick checks.")


@dataclass
class DeepSpeedArgs:
    zero_stage: int = arg(0, "ZeRO stage.", choices=(0, 1, 2, 3))
    offload: bool = arg(False, "Offload optimizer state to CPU (ZeRO >= 2) and parameters (ZeRO 3).")
    dtype: str = arg(
        default_factory=default_dtype, choices=("fp16", "bf16", "fp32"),
        help="Training dtype. Default: fp16 on GPU (DeepSpeed-Chat's default), bf16 on a CPU-only "
        "machine, where DeepSpeed cannot run fp16.")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass.")
    compute_fp32_loss: bool = arg(False, "Compute the loss from fp32 logits (for bf16/fp16 training).")
    gradient_clipping: float = arg(1.0, "Global gradient-norm clip (DeepSpeed-Chat: 1.0).")
    deepspeed_config: str | None = arg(
        None, "A DeepSpeed JSON config (see ds_configs/). Its \"auto\" values are filled from the "
        "flags; explicit values are kept.")
    deepspeed: bool = arg(False, "Accepted for DeepSpeed-Chat launch scripts; DeepSpeed is always on.")
    local_rank: int = arg(-1, "Set by the launcher; ignored (LOCAL_RANK from the environment wins).")


@dataclass
class LoRAArgs:
    lora_dim: int = arg(0, "LoRA rank; > 0 enables LoRA (peft).")
    lora_module_name: str = arg(
        "auto", "LoRA goes on the Linear layers whose name contains this string. 'auto': every "
        "Linear layer of the decoder stack, for any model family. DeepSpeed-Chat's default "
        "'decoder.layers.' matches OPT only.")
    only_optimize_lora: bool = arg(False, "Train only the LoRA weights; the base model stays frozen.")
    lora_learning_rate: float = arg(5e-4, "Learning rate of the LoRA weights.")
    lora_scaling: float = arg(
        1.0, "LoRA output scale numerator: the update is multiplied by lora_scaling / lora_dim "
        "(DeepSpeed-Chat's convention; peft's lora_alpha).")


@dataclass
class LogArgs:
    output_dir: str = arg("output/step1_sft", "Where the model, checkpoints, metrics and plots go.")
    enable_tensorboard: bool = arg(False, "Write TensorBoard events.")
    tensorboard_path: str = arg("step1_tensorboard", "TensorBoard folder; relative to --output_dir.")
    enable_wandb: bool = arg(False, "Log to Weights & Biases (needs the wandb package).")
    wandb_project: str = arg("rlhf-engine", "W&B project name.")
    print_loss: bool = arg(False, "Log the loss of every step on every rank (DeepSpeed-Chat flag).")
    print_interval: int = arg(10, "Log throughput, TFLOPs and peak memory every N optimizer steps.")
    save_interval: int = arg(
        0, "Every N optimizer steps write a Hugging Face folder checkpoint-<step>/ and a DeepSpeed "
        "checkpoint for --resume (0: only the final model).")
    save_total_limit: int = arg(
        0, "Keep only the newest N checkpoints (checkpoint-<step>/ and their --resume state; 0: keep all).")
    resume: bool = arg(
        False, "Continue from the last complete checkpoint in --output_dir (an incomplete or truncated one, "
        "e.g. from a kill during a save, is skipped with a warning).")
    disable_tqdm: bool = arg(False, "No progress bar.")


@dataclass
class FaultArgs:
    peer_timeout: float = arg(
        180.0, "Seconds a rank may go without a heartbeat before the others presume it dead and stop, "
        "naming it (0: no watchdog; collectives then wait for DeepSpeed's 30-minute timeout).")
    max_bad_steps: int = arg(
        10, "Stop after this many consecutive bad steps: a NaN or inf loss or reward, or an update the "
        "optimizer skipped (fp16 loss-scale overflow). 0: never stop.")


@dataclass
class Step1Config:
    """Step 1: supervised fine-tuning."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    ds: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    log: LogArgs = field(default_factory=LogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)


@dataclass
class RewardTrainArgs(TrainArgs):
    learning_rate: float = arg(5e-5, "Peak learning rate (DeepSpeed-Chat's step-2 default).")
    eval_interval: int = arg(
        0, "Also evaluate every N optimizer steps (0: only before training and after each epoch).")
    eval_iters: int = arg(100, "Evaluate on at most this many batches per rank.")


@dataclass
class RewardArgs:
    num_padding_at_beginning: int = arg(
        1, "Leading tokens that may equal the pad id yet are real (OPT's BOS when pad = bos; "
        "DeepSpeed-Chat's flag). Used where a mask is rebuilt from pad ids; padded batches carry their own mask.")
    rm_loss: str = arg(
        "end", "Pairwise loss: 'end' = Bradley-Terry on the end scores (as TRL and OpenRLHF; the score "
        "step 3 uses), 'span' = DeepSpeed-Chat's per-token loss over the span where chosen and rejected "
        "differ.", choices=("end", "span"))
    rm_margin: float = arg(0.0, "Required score gap: loss = -logsigmoid(chosen - rejected - margin).")
    rm_l2_coef: float = arg(
        0.0, "Adds coef * mean((chosen + rejected)^2), which centres scores on 0 (0: off).")


@dataclass
class RewardLogArgs(LogArgs):
    output_dir: str = arg("output/step2_reward", "Where the model, checkpoints, metrics and plots go.")
    tensorboard_path: str = arg("step2_tensorboard", "TensorBoard folder; relative to --output_dir.")


@dataclass
class Step2Config:
    """Step 2: reward model."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: RewardTrainArgs = field(default_factory=RewardTrainArgs)
    ds: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    reward: RewardArgs = field(default_factory=RewardArgs)
    log: RewardLogArgs = field(default_factory=RewardLogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)


@dataclass
class Step3ModelArgs:
    actor_model_name_or_path: str = arg(
        "output/step1_sft", "The step-1 (SFT) model folder: the actor starts from it and the frozen "
        "reference is a copy of it. Default: where step 1 writes by default.")
    critic_model_name_or_path: str = arg(
        "output/step2_reward", "The step-2 reward-model folder: the frozen reward model and the "
        "critic's starting point. Default: where step 2 writes by default.")
    actor_dropout: float | None = arg(None, "Set every dropout probability of the actor (None keeps the model's).")
    critic_dropout: float | None = arg(None, "Set every dropout probability of the critic (None keeps the model's).")
    attn_implementation: str = arg(
        "sdpa", "Attention kernel. flash_attention_2 needs the flash-attn package (a GPU extra).",
        choices=("sdpa", "eager", "flash_attention_2"))
    trust_remote_code: bool = arg(
        False, "Allow model/tokenizer code from the model folders or hub to run. Off: only built-in "
        "transformers architectures load.")
    num_padding_at_beginning: int = arg(
        1, "Accepted for DeepSpeed-Chat scripts (OPT's BOS equals its pad id). Step 3 carries real "
        "attention masks from the prompts and generation, so no count of leading pads is needed.")


@dataclass
class Step3DataArgs:
    data_path: list[str] = arg(
        default_factory=list, help="Prompt datasets (any step-1/step-2 format; only the prompt is used). "
        "Default: the bundled synthetic sorting task.")
    data_split: str = arg(
        "2,4,4", "Comma-separated weights of the slices given to steps 1, 2 and 3; step 3 uses the third.")
    data_output_path: str | None = arg(
        None, "Folder for the tokenized cache. Default: <output_dir>/data_cache.")
    max_prompt_seq_len: int = arg(
        256, "Prompts are left-padded to this many tokens; longer prompts are dropped and counted.")
    max_answer_seq_len: int = arg(256, "Most tokens generated per answer.")
    add_eot_token: bool = arg(
        False, "Add --eot_token to the tokenizer as a special token (as step 1 did with the same flag).")
    eot_token: str = arg("<|endoftext|>", "The end-of-text token used with --add_eot_token.")
    unsupervised_dataset_name: str | None = arg(
        None, "PTX: a pretraining-style dataset mixed into the actor's updates (a hub name with "
        "--unsupervised_dataset_config_name, or a local .txt/.json/.jsonl/.parquet file or folder). "
        "None: no PTX.")
    unsupervised_dataset_config_name: str | None = arg(
        None, "The hub dataset's config name (e.g. wikitext-2-raw-v1 for wikitext).")
    unsup_coef: float = arg(
        27.8, "Weight of the PTX language-modelling loss (InstructGPT's value, DeepSpeed-Chat's default).")
    preprocessing_num_workers: int | None = arg(
        None, "Processes for tokenizing the PTX dataset (datasets' num_proc).")


@dataclass
class Step3TrainArgs:
    per_device_generation_batch_size: int = arg(16, "Prompts per rank per generation batch.")
    per_device_training_batch_size: int = arg(16, "Sequences per rank per PPO micro-batch.")
    generation_batches: int = arg(
        1, "Generation batches collected before the PPO updates that use them (one PPO step).")
    ppo_epochs: int = arg(1, "Passes of PPO updates over each step's experience.")
    actor_learning_rate: float = arg(9.65e-6, "Peak learning rate of the actor.")
    critic_learning_rate: float = arg(5e-6, "Peak learning rate of the critic.")
    actor_weight_decay: float = arg(0.0, "AdamW weight decay of the actor.")
    critic_weight_decay: float = arg(0.0, "AdamW weight decay of the critic.")
    num_train_epochs: int = arg(1, "Passes over the step-3 prompts.")
    gradient_accumulation_steps: int = arg(1, "PPO micro-batches per optimizer step.")
    lr_scheduler_type: str = arg(
        "cosine", "Learning-rate schedule of both trained roles (transformers' get_scheduler).",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup"))
    num_warmup_steps: int = arg(100, "Warm-up optimizer steps of the schedules (DeepSpeed-Chat: 100).")
    adam_beta1: float = arg(0.9, "Adam beta1 (DeepSpeed-Chat: 0.9).")
    adam_beta2: float = arg(0.95, "Adam beta2 (DeepSpeed-Chat: 0.95).")
    seed: int = arg(1234, "Seed of the data split, shuffling, sampling and dropout.")
    enable_test_mode: bool = arg(False, "Stop after --test_stop_step PPO steps (DeepSpeed-Chat flag).")
    test_stop_step: int = arg(
        0, "Stop after this many PPO steps without changing the schedule (0: run to the end).")


@dataclass
class PPOArgs:
    kl_ctl: float = arg(0.1, "Per-token KL penalty coefficient (the initial one with --target_kl).")
    kl_estimator: str = arg(
        "k1", "Per-token KL estimate: k1 = log p - log p_ref (DeepSpeed-Chat), k2 = (log ratio)^2 / 2, "
        "k3 = exp(r) - 1 - r (never negative).", choices=("k1", "k2", "k3"))
    target_kl: float | None = arg(
        None, "Adaptive KL controller (Ziegler et al.): steer the KL per sequence towards this value. "
        "None: fixed --kl_ctl.")
    kl_horizon: int = arg(10000, "Horizon (in sequences) of the adaptive KL controller.")
    clip_reward_value: float = arg(5.0, "Reward-model scores are clipped to [-v, v].")
    normalize_reward: bool = arg(
        False, "Normalise scores by the running mean and std of all scores seen so far (before clipping).")
    gamma: float = arg(1.0, "GAE discount.")
    lam: float = arg(0.95, "GAE lambda.")
    whiten_advantages: bool = arg(False, "Whiten advantages over each generation batch (DeepSpeed-Chat: no).")
    cliprange: float = arg(0.2, "PPO ratio clip epsilon.")
    cliprange_value: float = arg(0.2, "Value clip epsilon around the old values.")
    entropy_coef: float = arg(0.0, "Entropy bonus coefficient in the actor loss.")
    do_sample: bool = arg(True, "Sample answers (off: greedy decoding).")
    temperature: float = arg(1.0, "Sampling temperature.")
    top_p: float = arg(1.0, "Nucleus sampling: keep the smallest token set with this probability mass.")
    top_k: int = arg(0, "Sample among the k most likely tokens (0: all).")
    enable_ema: bool = arg(False, "Keep an exponential moving average of the actor, saved as actor_ema/.")
    ema_decay: float = arg(0.992, "EMA decay: ema = decay * ema + (1 - decay) * actor after each actor update.")
    align_overflow: bool = arg(
        False, "fp16: when the actor or the critic overflows, skip both optimizer steps.")
    eval_interval: int = arg(
        0, "Also evaluate the actor (answers to held-out prompts: reward score, length, and the "
        "rule-checked success rate where the data defines one) every N PPO steps (0: before and after training).")
    eval_prompts: int = arg(256, "Held-out prompts per evaluation (all ranks together, at most).")
    eval_greedy: bool = arg(
        False, "Evaluate greedy answers. Default: answers decoded as in the rollouts (what PPO optimises), "
        "with a fixed seed so every evaluation sees the same sampling noise.")
    warn_kl_above: float = arg(
        10.0, "Log a warning when the mean KL to the reference per sequence exceeds this (nats).")


@dataclass
class Step3DeepSpeedArgs:
    actor_zero_stage: int = arg(0, "ZeRO stage of the actor (the reference follows: 3 if this is 3, else 0).",
                                choices=(0, 1, 2, 3))
    critic_zero_stage: int = arg(0, "ZeRO stage of the critic (the reward model follows: 3 if this is 3, else 0).",
                                 choices=(0, 1, 2, 3))
    offload: bool = arg(False, "Offload the actor's and critic's optimizer state (and ZeRO-3 parameters) to CPU.")
    offload_reference_model: bool = arg(False, "Offload the reference model's parameters to CPU (ZeRO-3 actor).")
    offload_reward_model: bool = arg(False, "Offload the reward model's parameters to CPU (ZeRO-3 critic).")
    dtype: str = arg(
        default_factory=default_dtype, choices=("fp16", "bf16", "fp32"),
        help="Dtype of all four roles. Default: fp16 on GPU (DeepSpeed-Chat's default), bf16 on a "
        "CPU-only machine, where DeepSpeed cannot run fp16.")
    actor_gradient_checkpointing: bool = arg(False, "Recompute the actor's activations in the backward pass.")
    critic_gradient_checkpointing: bool = arg(False, "Recompute the critic's activations in the backward pass.")
    compute_fp32_loss: bool = arg(
        False, "Accepted for DeepSpeed-Chat scripts: step 3 always computes log-probs and losses in fp32.")
    gradient_clipping: float = arg(1.0, "Global gradient-norm clip of both trained roles.")
    enable_hybrid_engine: bool = arg(
        False, "Generate with the hybrid train/generate mode: the actor's ZeRO-3 shards gathered once "
        "per generation batch, LoRA fused, KV cache, any model family, CPU too.")
    unpin_actor_parameters: bool = arg(
        False, "Hybrid mode under ZeRO-3: do not hold the gathered actor for the whole generation; "
        "gather layer by layer per token instead (less memory, much slower).")
    release_inference_cache: bool = arg(
        False, "Hybrid mode: return the generation's cached memory (KV cache) to the device after each "
        "generation batch.")
    inference_tp_size: int = arg(
        1, "Tensor-parallel degree of generation. Only 1 is implemented; other values are refused.")
    tp_gather_partition_size: int = arg(
        8, "Layers gathered at a time for tensor-parallel generation; used only with --inference_tp_size > 1.")
    enable_mixed_precision_lora: bool = arg(
        False, "MixZ++: quantize the actor's frozen base weights under ZeRO-3 with LoRA (needs a CUDA GPU).")
    actor_quantization: str = arg(
        "none", "QLoRA: load the actor's base Linear weights in 4-bit NF4 (bitsandbytes, computing in --dtype), "
        "frozen, and train LoRA adapters on them. Needs --actor_lora_dim > 0, --only_optimize_lora and "
        "--actor_zero_stage 0-2; pair with --reference_quantization 4bit, or the KL also measures the base's "
        "rounding. The saved actor/ is full precision (the base re-read from the actor folder, LoRA merged).",
        choices=("none", "4bit"))
    reference_quantization: str = arg(
        "none", "Load the frozen reference's Linear weights with bitsandbytes: 8bit (LLM.int8) or 4bit (NF4). "
        "A quantized reference is whole on every rank (ZeRO cannot partition it), even with --actor_zero_stage 3.",
        choices=("none", "8bit", "4bit"))
    reward_quantization: str = arg(
        "none", "Load the frozen reward model's Linear weights with bitsandbytes: 8bit (LLM.int8) or 4bit (NF4); "
        "its value head stays in --dtype. Whole on every rank, even with --critic_zero_stage 3.",
        choices=("none", "8bit", "4bit"))
    deepspeed_config: str | None = arg(
        None, "A DeepSpeed JSON config for the trained roles; its \"auto\" values are filled from the flags.")
    auto_fit: bool = arg(
        False, "Let the memory planner (python -m engine.planner) choose the memory settings left at their "
        "defaults (ZeRO stages, offload, LoRA, gradient checkpointing, quantized roles, hybrid mode, batch "
        "sizes up to the given ones) for this machine's GPUs; flags you set are kept.")
    deepspeed: bool = arg(False, "Accepted for DeepSpeed-Chat launch scripts; DeepSpeed is always on.")
    local_rank: int = arg(-1, "Set by the launcher; ignored (LOCAL_RANK from the environment wins).")


@dataclass
class Step3LoRAArgs:
    actor_lora_dim: int = arg(0, "LoRA rank of the actor; > 0 enables LoRA (peft).")
    critic_lora_dim: int = arg(0, "LoRA rank of the critic; > 0 enables LoRA (peft).")
    actor_lora_module_name: str = arg(
        "auto", "Actor Linear layers whose name contains this get LoRA ('auto': every decoder Linear layer).")
    critic_lora_module_name: str = arg(
        "auto", "Critic Linear layers whose name contains this get LoRA ('auto': every decoder Linear layer).")
    only_optimize_lora: bool = arg(False, "Train only the LoRA weights (and the critic's value head).")
    actor_lora_learning_rate: float = arg(5e-4, "Learning rate of the actor's LoRA weights.")
    critic_lora_learning_rate: float = arg(5e-4, "Learning rate of the critic's LoRA weights.")
    lora_scaling: float = arg(1.0, "LoRA output scale numerator (update x lora_scaling / lora_dim).")


@dataclass
class Step3LogArgs(LogArgs):
    output_dir: str = arg("output/step3_rlhf", "Where actor/, critic/, actor_ema/, checkpoints, metrics and plots go.")
    tensorboard_path: str = arg("step3_tensorboard", "TensorBoard folder; relative to --output_dir.")
    print_interval: int = arg(1, "Log a summary line every N PPO steps.")
    save_interval: int = arg(
        0, "Every N PPO steps write checkpoint-<step>/{actor,critic} and the state --resume reads (0: only "
        "the final models).")
    print_answers: bool = arg(False, "Print a prompt and its generated answer from every rank.")
    print_answers_interval: int = arg(1, "With --print_answers, every N PPO steps.")


@dataclass
class Step3Config:
    """Step 3: PPO RLHF with actor, critic, reference and reward model."""

    model: Step3ModelArgs = field(default_factory=Step3ModelArgs)
    data: Step3DataArgs = field(default_factory=Step3DataArgs)
    train: Step3TrainArgs = field(default_factory=Step3TrainArgs)
    ppo: PPOArgs = field(default_factory=PPOArgs)
    ds: Step3DeepSpeedArgs = field(default_factory=Step3DeepSpeedArgs)
    lora: Step3LoRAArgs = field(default_factory=Step3LoRAArgs)
    log: Step3LogArgs = field(default_factory=Step3LogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)

    # Per-role views in the shared parts' types, for the loaders steps 1 and 2 use.
    def role_model(self, role: str) -> ModelArgs:
        """ModelArgs of 'actor' or 'critic' (the reference and reward model load like them)."""
        return ModelArgs(model_name_or_path=getattr(self.model, f"{role}_model_name_or_path"),
                         dropout=getattr(self.model, f"{role}_dropout"),
                         attn_implementation=self.model.attn_implementation,
                         trust_remote_code=self.model.trust_remote_code)

    def role_lora(self, role: str) -> LoRAArgs:
        return LoRAArgs(lora_dim=getattr(self.lora, f"{role}_lora_dim"),
                        lora_module_name=getattr(self.lora, f"{role}_lora_module_name"),
                        only_optimize_lora=self.lora.only_optimize_lora,
                        lora_learning_rate=getattr(self.lora, f"{role}_lora_learning_rate"),
                        lora_scaling=self.lora.lora_scaling)

    def data_args(self) -> DataArgs:
        """The step-3 data flags as DataArgs (for the shared split, cache and tokenizer code)."""
        return DataArgs(data_path=list(self.data.data_path), data_split=self.data.data_split,
                        data_output_path=self.data.data_output_path, add_eot_token=self.data.add_eot_token,
                        eot_token=self.data.eot_token)


# ----------------------------------------------------------------------------------------------
# Flags from fields
# ----------------------------------------------------------------------------------------------
def leaf_fields(config_cls: type) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """flag name -> (part attribute, field, resolved type), over every part of a step config."""
    out: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for part in dataclasses.fields(config_cls):
        part_cls = typing.get_type_hints(config_cls)[part.name]
        hints = typing.get_type_hints(part_cls)
        for f in dataclasses.fields(part_cls):
            if f.name in out:
                raise TypeError(f"flag --{f.name} is declared twice ({out[f.name][0]}, {part.name})")
            out[f.name] = (part.name, f, hints[f.name])
    return out


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, optional?) for `int`, `float | None`, `list[str]`..."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag value is a UserError (one line, exit 2) like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see --help")


def build_parser(config_cls: type, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of flag values; flags override it.")
    for name, (_, f, tp) in leaf_fields(config_cls).items():
        base, _ = _base_type(tp)
        # Defaults are SUPPRESSed so that only flags given on the command line override the YAML;
        # the help shows the field's default itself.
        help_text = f"{f.metadata.get('help', '')} (default: {_field_default(f)!r})"
        kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "default": argparse.SUPPRESS}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is list:
            parser.add_argument(f"--{name}", nargs="*", type=typing.get_args(base)[0], **kwargs)
        else:
            parser.add_argument(f"--{name}", type=base, **kwargs)
    return parser


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against the field type (YAML reads 1e-3 as a string)."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config key '{name}' cannot be null; give a value or remove the key")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if typing.get_origin(base) is list:
            items = value if isinstance(value, list) else [value]
            return [typing.get_args(base)[0](v) for v in items]
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{name}': {value!r} is not a valid "
                        f"{getattr(base, '__name__', base)}") from None


def _read_yaml(path: str, config_cls: type) -> dict[str, Any]:
    """Flat keys (`zero_stage: 3`) or keys grouped under part names (`ds: {zero_stage: 3}`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"--config {path} is not valid YAML{where}: {problem}; fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold a mapping of flag names to values")
    parts = {f.name for f in dataclasses.fields(config_cls)}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in parts and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None, description: str = "") -> C:
    """Defaults < --config YAML < flags; then `validate` the result."""
    parser = build_parser(config_cls, description)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown flag(s) {' '.join(unknown)}; see --help for the flags of this step")
    cli = {k: v for k, v in vars(ns).items() if k != "config"}
    leaves = leaf_fields(config_cls)
    from_file = _read_yaml(ns.config, config_cls) if ns.config else {}
    bad = sorted(set(from_file) - set(leaves))
    if bad:
        raise UserError(f"--config {ns.config}: unknown key(s) {', '.join(bad)}; keys are flag names")
    values = {k: _coerce(k, v, leaves[k][2]) for k, v in from_file.items()}
    values.update(cli)
    for name, value in values.items():
        choices = leaves[name][1].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"--{name} {value!r}: choose one of {', '.join(map(str, choices))}")
    return make_config(config_cls, values)


def make_config(config_cls: type[C], values: dict[str, Any] | None = None) -> C:
    """Build a step config from flat flag values (the rest default) and validate it."""
    values = values or {}
    leaves = leaf_fields(config_cls)
    bad = sorted(set(values) - set(leaves))
    if bad:
        raise UserError(f"unknown config key(s) {', '.join(bad)}")
    per_part: dict[str, dict[str, Any]] = {}
    for name, (part, f, _) in leaves.items():
        per_part.setdefault(part, {})[name] = values[name] if name in values else _field_default(f)
    hints = typing.get_type_hints(config_cls)
    cfg = config_cls(**{part: hints[part](**kw) for part, kw in per_part.items()})
    validate(cfg)
    return cfg


def flag_table(config_cls: type) -> str:
    """The Markdown flag reference of a step (the README embeds it; a test keeps the two equal)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name, (_, f, _) in leaf_fields(config_cls).items():
        default = "fp16 on GPU, bf16 on CPU" if name == "dtype" else repr(_field_default(f))
        text = f.metadata.get("help", "").replace("|", "/")
        if f.metadata.get("choices"):
            text += " Choices: " + ", ".join(map(str, f.metadata["choices"])) + "."
        rows.append(f"| `--{name}` | `{default}` | {text} |")
    return "\n".join(rows) + "\n"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config_yaml(cfg: Any, path: Path) -> None:
    """The resolved config as YAML, written to a temp file and renamed: a crash never leaves half of it."""
    from engine.runtime.atomic import write_atomically

    write_atomically(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Validation: raise, never rewrite
# ----------------------------------------------------------------------------------------------
def parse_data_split(text: str) -> list[float]:
    """'2,4,4' -> [0.2, 0.4, 0.4]."""
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--data_split {text!r}: give three comma-separated numbers, e.g. 2,4,4") from None
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--data_split {text!r}: give three non-negative numbers with a positive "
                        "sum, one per step, e.g. 2,4,4")
    total = sum(weights)
    return [w / total for w in weights]


def _deepspeed_config_problems(path: str) -> list[str]:
    """A --deepspeed_config that is missing, a folder or not a JSON object (its values are checked against
    the flags when the DeepSpeed config is built)."""
    from engine.runtime.ds_config import load_template

    if Path(path).is_dir():
        return [f"--deepspeed_config {path} is a folder; give a DeepSpeed JSON file (see ds_configs/)"]
    if not Path(path).is_file():
        return [f"--deepspeed_config {path}: no such file; give a DeepSpeed JSON file (see ds_configs/)"]
    try:
        load_template(path)
    except UserError as err:
        return [str(err)]
    return []


def _cache_folder_problems(path: str | None) -> list[str]:
    """A --data_output_path that is a file (a folder that is missing is made)."""
    if path and Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        return [f"--data_output_path {path} is a file; give a folder path for the tokenized-data cache"]
    return []


def _validate_part(part: Any) -> list[str]:
    problems: list[str] = []
    if isinstance(part, DeepSpeedArgs):
        if part.offload and part.zero_stage < 2:
            problems.append(f"--offload needs --zero_stage 2 or 3 (got {part.zero_stage}); "
                            "DeepSpeed ignores offload below stage 2")
        if part.dtype == "fp16" and not _cuda_available():
            problems.append("--dtype fp16 needs a GPU (DeepSpeed cannot run fp16 on a CPU); "
                            "use --dtype bf16 or fp32")
        if part.gradient_clipping < 0:
            problems.append("--gradient_clipping must be >= 0 (0 disables clipping)")
        if part.deepspeed_config:
            problems += _deepspeed_config_problems(part.deepspeed_config)
    elif isinstance(part, LoRAArgs):
        if part.lora_dim < 0:
            problems.append(f"--lora_dim must be >= 0 (got {part.lora_dim}); 0 disables LoRA")
        if part.only_optimize_lora and part.lora_dim == 0:
            problems.append("--only_optimize_lora needs --lora_dim > 0")
        if not part.lora_module_name:
            problems.append("--lora_module_name is empty; use 'auto' or a name fragment like 'layers.'")
    elif isinstance(part, ModelArgs):
        if part.dropout is not None and not 0.0 <= part.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1) (got {part.dropout})")
        if part.attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
            problems.append("--attn_implementation flash_attention_2 needs the flash-attn package "
                            "(pip install -e '.[flash]' on a CUDA machine); use sdpa or eager")
    elif isinstance(part, DataArgs):
        try:
            parse_data_split(part.data_split)
        except UserError as err:
            problems.append(str(err))
        if part.max_seq_len < 2:
            problems.append(f"--max_seq_len must be >= 2 (got {part.max_seq_len})")
        problems += _cache_folder_problems(part.data_output_path)
    elif isinstance(part, TrainArgs):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "num_train_epochs"):
            if getattr(part, name) < 1:
                problems.append(f"--{name} must be >= 1 (got {getattr(part, name)})")
        if part.learning_rate <= 0:
            problems.append(f"--learning_rate must be > 0 (got {part.learning_rate})")
        if part.num_warmup_steps < 0 or part.test_stop_step < 0:
            problems.append("--num_warmup_steps and --test_stop_step must be >= 0")
        if isinstance(part, RewardTrainArgs) and (part.eval_interval < 0 or part.eval_iters < 1):
            problems.append("--eval_interval must be >= 0 and --eval_iters >= 1")
    elif isinstance(part, RewardArgs):
        if part.num_padding_at_beginning < 0 or part.rm_margin < 0 or part.rm_l2_coef < 0:
            problems.append("--num_padding_at_beginning, --rm_margin and --rm_l2_coef must be >= 0")
    elif isinstance(part, LogArgs):
        if part.save_interval < 0 or part.print_interval < 1:
            problems.append("--save_interval must be >= 0 and --print_interval >= 1")
        if part.save_total_limit < 0:
            problems.append(f"--save_total_limit must be >= 0 (got {part.save_total_limit})")
        if part.save_total_limit and not part.save_interval:
            problems.append("--save_total_limit needs --save_interval > 0 (no checkpoints are written without it)")
    elif isinstance(part, FaultArgs):
        if part.peer_timeout < 0 or part.max_bad_steps < 0:
            problems.append("--peer_timeout and --max_bad_steps must be >= 0")
    return problems


def _validate_step3(cfg: Step3Config) -> list[str]:
    """Cross-part checks of step 3 (each part's own ranges are below, in `_validate_part`)."""
    problems: list[str] = []
    t, d, ds, ppo, lora = cfg.train, cfg.data, cfg.ds, cfg.ppo, cfg.lora
    for name in ("per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
                 "ppo_epochs", "num_train_epochs", "gradient_accumulation_steps"):
        if getattr(t, name) < 1:
            problems.append(f"--{name} must be >= 1 (got {getattr(t, name)})")
    if not problems:
        rollout = t.per_device_generation_batch_size * t.generation_batches
        if t.per_device_generation_batch_size % t.per_device_training_batch_size:
            problems.append(f"--per_device_generation_batch_size {t.per_device_generation_batch_size} must be a "
                            f"multiple of --per_device_training_batch_size {t.per_device_training_batch_size} "
                            "(each generation batch is cut into PPO micro-batches)")
        elif (rollout // t.per_device_training_batch_size) % t.gradient_accumulation_steps:
            problems.append(f"a PPO step has {rollout // t.per_device_training_batch_size} micro-batches per rank, "
                            f"not a multiple of --gradient_accumulation_steps {t.gradient_accumulation_steps}")
    for name in ("actor_learning_rate", "critic_learning_rate",
                 "actor_lora_learning_rate", "critic_lora_learning_rate"):
        value = getattr(t if hasattr(t, name) else lora, name)
        if value <= 0:
            problems.append(f"--{name} must be > 0 (got {value})")
    if t.num_warmup_steps < 0 or t.test_stop_step < 0:
        problems.append("--num_warmup_steps and --test_stop_step must be >= 0")
    if t.enable_test_mode and t.test_stop_step == 0:
        problems.append("--enable_test_mode needs --test_stop_step > 0 (the PPO step to stop after)")
    if d.max_prompt_seq_len < 1 or d.max_answer_seq_len < 1:
        problems.append("--max_prompt_seq_len and --max_answer_seq_len must be >= 1")
    if d.unsupervised_dataset_config_name and not d.unsupervised_dataset_name:
        problems.append("--unsupervised_dataset_config_name needs --unsupervised_dataset_name")
    if d.unsupervised_dataset_name:
        from engine.data.unsupervised import missing_source_problem

        ptx_problem = missing_source_problem(d.unsupervised_dataset_name)  # a local path that is not there
        if ptx_problem:
            problems.append(ptx_problem)
    problems += _cache_folder_problems(d.data_output_path)
    if d.unsup_coef < 0:
        problems.append(f"--unsup_coef must be >= 0 (got {d.unsup_coef})")
    try:
        parse_data_split(d.data_split)
    except UserError as err:
        problems.append(str(err))
    for role in ("actor", "critic"):
        dropout = getattr(cfg.model, f"{role}_dropout")
        if dropout is not None and not 0.0 <= dropout < 1.0:
            problems.append(f"--{role}_dropout must be in [0, 1) (got {dropout})")
        if getattr(lora, f"{role}_lora_dim") < 0:
            problems.append(f"--{role}_lora_dim must be >= 0 (0 disables LoRA)")
        if not getattr(lora, f"{role}_lora_module_name"):
            problems.append(f"--{role}_lora_module_name is empty; use 'auto' or a name fragment like 'layers.'")
    if lora.lora_scaling <= 0:
        problems.append(f"--lora_scaling must be > 0 (got {lora.lora_scaling})")
    if lora.only_optimize_lora and lora.actor_lora_dim == 0 and lora.critic_lora_dim == 0:
        problems.append("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
    if cfg.model.num_padding_at_beginning < 0:
        problems.append("--num_padding_at_beginning must be >= 0")
    if cfg.model.attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        problems.append("--attn_implementation flash_attention_2 needs the flash-attn package; use sdpa or eager")
    # DeepSpeed settings per role.
    if ds.offload and min(ds.actor_zero_stage, ds.critic_zero_stage) < 2:
        problems.append(f"--offload needs --actor_zero_stage and --critic_zero_stage >= 2 (got "
                        f"{ds.actor_zero_stage} and {ds.critic_zero_stage}); DeepSpeed ignores offload below stage 2")
    if ds.offload_reference_model and ds.actor_zero_stage != 3:
        problems.append("--offload_reference_model needs --actor_zero_stage 3 (the reference is partitioned "
                        "like the actor; DeepSpeed offloads parameters only under ZeRO-3)")
    if ds.offload_reward_model and ds.critic_zero_stage != 3:
        problems.append("--offload_reward_model needs --critic_zero_stage 3 (the reward model is partitioned "
                        "like the critic; DeepSpeed offloads parameters only under ZeRO-3)")
    if ds.dtype == "fp16" and not _cuda_available():
        problems.append("--dtype fp16 needs a GPU (DeepSpeed cannot run fp16 on a CPU); use --dtype bf16 or fp32")
    if ds.gradient_clipping < 0:
        problems.append("--gradient_clipping must be >= 0 (0 disables clipping)")
    if ds.deepspeed_config:
        problems += _deepspeed_config_problems(ds.deepspeed_config)
    if ds.inference_tp_size != 1:
        problems.append(f"--inference_tp_size {ds.inference_tp_size}: tensor-parallel generation is not "
                        "implemented; use 1 (the hybrid mode gathers the whole actor on each rank, and "
                        "--unpin_actor_parameters lowers its memory)")
    if ds.tp_gather_partition_size < 1:
        problems.append("--tp_gather_partition_size must be >= 1")
    if ds.unpin_actor_parameters and not ds.enable_hybrid_engine:
        problems.append("--unpin_actor_parameters is a hybrid-mode setting; add --enable_hybrid_engine")
    if ds.release_inference_cache and not ds.enable_hybrid_engine:
        problems.append("--release_inference_cache is a hybrid-mode setting; add --enable_hybrid_engine")
    if ds.enable_mixed_precision_lora:
        if lora.actor_lora_dim == 0 or ds.actor_zero_stage != 3:
            problems.append("--enable_mixed_precision_lora needs --actor_lora_dim > 0 and --actor_zero_stage 3")
        elif not _cuda_available():
            problems.append("--enable_mixed_precision_lora needs a CUDA GPU (DeepSpeed's quantized ZeRO-3 "
                            "weights have no CPU kernels); drop the flag on this machine")
        elif ds.enable_hybrid_engine:
            problems.append("--enable_mixed_precision_lora cannot be combined with --enable_hybrid_engine "
                            "(the hybrid mode gathers full-precision weights); choose one, as DeepSpeed-Chat's "
                            "llama2 _mixz script does")
    problems += _quantization_problems(cfg)
    if ppo.align_overflow and ds.dtype != "fp16":
        problems.append("--align_overflow is about fp16 loss-scale overflow; bf16 and fp32 never overflow, "
                        "so use it only with --dtype fp16")
    elif ppo.align_overflow and min(ds.actor_zero_stage, ds.critic_zero_stage) < 1:
        problems.append("--align_overflow needs --actor_zero_stage and --critic_zero_stage >= 1 (it reads the "
                        "ZeRO optimizers' overflow flags)")
    # PPO coefficients.
    if ppo.kl_ctl < 0 or ppo.entropy_coef < 0:
        problems.append("--kl_ctl and --entropy_coef must be >= 0")
    if ppo.target_kl is not None and ppo.target_kl <= 0:
        problems.append("--target_kl must be > 0 (or left unset for a fixed --kl_ctl)")
    if ppo.warn_kl_above <= 0:
        problems.append("--warn_kl_above must be > 0")
    if ppo.kl_horizon < 1:
        problems.append("--kl_horizon must be >= 1")
    if ppo.clip_reward_value <= 0 or ppo.cliprange <= 0 or ppo.cliprange_value <= 0:
        problems.append("--clip_reward_value, --cliprange and --cliprange_value must be > 0")
    if not (0.0 <= ppo.gamma <= 1.0 and 0.0 <= ppo.lam <= 1.0):
        problems.append("--gamma and --lam must be in [0, 1]")
    if ppo.temperature <= 0 or not 0.0 < ppo.top_p <= 1.0 or ppo.top_k < 0:
        problems.append("--temperature must be > 0, --top_p in (0, 1] and --top_k >= 0")
    if not 0.0 <= ppo.ema_decay <= 1.0:
        problems.append(f"--ema_decay must be in [0, 1] (got {ppo.ema_decay})")
    if ppo.eval_interval < 0 or ppo.eval_prompts < 1:
        problems.append("--eval_interval must be >= 0 and --eval_prompts >= 1")
    if cfg.log.print_answers_interval < 1:
        problems.append("--print_answers_interval must be >= 1")
    return problems


def missing_quantization_packages() -> list[str]:
    """The packages bitsandbytes quantization needs that are not installed (transformers loads bitsandbytes
    models through accelerate's device map)."""
    return [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]


def _quantization_problems(cfg: Step3Config) -> list[str]:
    """Checks of --actor_quantization, --reference_quantization and --reward_quantization."""
    problems: list[str] = []
    ds, lora = cfg.ds, cfg.lora
    chosen = [f"--{role}_quantization" for role in ("actor", "reference", "reward")
              if getattr(ds, f"{role}_quantization") != "none"]
    missing = missing_quantization_packages() if chosen else []
    if missing:
        problems.append(f"{' and '.join(chosen)} {'need' if len(chosen) > 1 else 'needs'} {' and '.join(missing)}, "
                        f"which {'are' if len(missing) > 1 else 'is'} not installed: pip install {' '.join(missing)}")
    if ds.actor_quantization != "none":
        if lora.actor_lora_dim == 0 or not lora.only_optimize_lora:
            problems.append(f"--actor_quantization {ds.actor_quantization} (QLoRA) trains LoRA adapters on a frozen "
                            "quantized base: add --actor_lora_dim 8 (or another rank > 0) and --only_optimize_lora")
        if ds.actor_zero_stage == 3:
            problems.append(f"--actor_quantization {ds.actor_quantization} needs --actor_zero_stage 0, 1 or 2: ZeRO-3 "
                            "cannot partition bitsandbytes weights (the 4-bit base is whole on every rank)")
    for role, flag in (("reference", "offload_reference_model"), ("reward", "offload_reward_model")):
        if getattr(ds, f"{role}_quantization") != "none" and getattr(ds, flag):
            problems.append(f"--{role}_quantization and --{flag} exclude each other: offloading moves ZeRO-3 "
                            f"partitions to the CPU, and a quantized {role} model is not partitioned; drop one of them")
    return problems


def validate(cfg: Any) -> None:
    """Raise one UserError listing every problem of the config."""
    problems: list[str] = []
    for part in dataclasses.fields(cfg):
        problems += _validate_part(getattr(cfg, part.name))
    if isinstance(cfg, Step3Config):
        problems += _validate_step3(cfg)
    elif not isinstance(cfg, Step1Config):
        # Shared DataArgs carries two step-1-only flags; elsewhere they would be silently ignored.
        if cfg.data.sft_only_data_path:
            problems.append("--sft_only_data_path is a step-1 flag; pass those datasets to step 1")
        if cfg.data.train_on_prompt:
            problems.append("--train_on_prompt is a step-1 flag (the reward model scores whole sequences)")
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))
