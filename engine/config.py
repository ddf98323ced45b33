"""The typed configs of the three steps: parts, each with its checks beside its fields.

Each step's config is a dataclass whose fields are parts (`ModelArgs`, `DataArgs`, ...). Every leaf
field is one flag with the same name (DeepSpeed-Chat's flat names: `--zero_stage`, `--lora_dim`);
its help text lives once, next to the field. Each part's `problems()` lists what is wrong with its
values (pure: it reads nothing but the fields); a step config's `problems()` adds the checks that span
parts. Step 3's per-role parts (`--actor_lora_dim`, `--critic_zero_stage`) are generated from the
shared parts by `role_twins`, and their checks are the shared part's, per role.

The flags, the YAML file and the checks that probe the machine (a GPU, installed packages, files) are
in `engine.flags` and `engine.preflight`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.errors import UserError

ROLES = ("actor", "critic")  # the trained roles of step 3; the reference and reward model load like them

# The sections of --help and of docs/flags.md, in this order: title -> what its flags set. A flag is in
# its part's section (PART_SECTIONS) unless its field names another (`arg(..., section=...)`).
SECTIONS = {
    "roles": "The models step 3 starts from (the actor and the frozen reference from step 1, the critic and "
             "the frozen reward model from step 2) and how the frozen ones are held.",
    "model": "How the model is loaded.",
    "data": "Datasets, their split between the steps, and sequence lengths.",
    "generation": "How the actor writes its answers during training.",
    "RL algorithm": "Rewards, KL, advantages and the policy loss (docs/step3.md, docs/rewards.md).",
    "reward model": "The pairwise loss of the reward model.",
    "DPO": "The DPO-family loss and how its frozen reference is held (docs/step2_dpo.md).",
    "training": "Batch sizes, optimizer, schedule and seed.",
    "DeepSpeed": "ZeRO, offload, dtype and the other memory settings.",
    "LoRA": "Low-rank adapters (peft).",
    "evaluation": "Evaluations of the actor during training.",
    "logging": "Output folder, logs, metrics and checkpoints.",
    "reliability": "What stops a run that has gone wrong.",
}
PART_SECTIONS = {"model": "model", "data": "data", "train": "training", "ds": "DeepSpeed", "lora": "LoRA",
                 "log": "logging", "fault": "reliability", "reward": "reward model", "dpo": "DPO",
                 "ppo": "RL algorithm", "rl": "RL algorithm"}


def arg(default: Any = None, help: str = "", choices: Sequence[Any] | None = None,
        default_factory: Any = None, section: str | None = None) -> Any:
    """A config field: its default, its help text and, optionally, the allowed values and the --help
    section it is listed in (default: its part's)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "section": section}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


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


def parse_column_map(text: str) -> dict[str, str]:
    """'question=prompt,answer=answer' -> {'question': 'prompt', 'answer': 'answer'} (dataset field -> name
    used here); '' -> {}."""
    mapping: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        source, sep, target = (s.strip() for s in entry.partition("="))
        if not sep or not source or not target:
            raise UserError(f"--prompt_column_map {text!r}: {entry!r} is not field=name; give comma-separated "
                            "pairs such as question=prompt,answer=answer")
        if source in mapping:
            raise UserError(f"--prompt_column_map {text!r}: field {source!r} is mapped twice; map it once")
        mapping[source] = target
    targets = list(mapping.values())
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise UserError(f"--prompt_column_map {text!r}: several fields are mapped to {', '.join(twice)}; map one "
                        "field to each name")
    return mapping


def _at_least(part: Any, names: Sequence[str], low: int = 1) -> list[str]:
    return [f"--{n} must be >= {low} (got {getattr(part, n)})" for n in names if getattr(part, n) < low]


def _tensorboard_help(job: str) -> str:
    return ("TensorBoard folder (with --enable_tensorboard). The default is inside --output_dir; a path you give "
            "is read as DeepSpeed-Chat reads it: relative to the working directory, the events in "
            f"<path>/ds_tensorboard_logs/{job}_tensorboard/ (--tensorboard_path $OUTPUT: beside the model).")


# ----------------------------------------------------------------------------------------------
# Shared parts
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    model_name_or_path: str | None = arg(
        None, "Hugging Face model folder or hub name. Default: the built-in tiny Llama model "
        "(random weights from a fixed seed), made on first use.")
    dropout: float | None = arg(
        None, "Set every dropout probability in the model config to this value. Default: the model's own.")
    attn_implementation: str = arg(
        "sdpa", "Attention kernel. flash_attention_2 needs the flash-attn package (a GPU extra).",
        choices=("sdpa", "eager", "flash_attention_2"))
    trust_remote_code: bool = arg(
        False, "Allow model/tokenizer code from the model folder or hub to run. Off: only built-in "
        "transformers architectures load.")

    def problems(self) -> list[str]:
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            return [f"--dropout must be in [0, 1) (got {self.dropout})"]
        return []


@dataclass
class DataArgs:
    data_path: list[str] = arg(
        default_factory=list, help="Datasets: DeepSpeed-Chat hub names (e.g. Dahoas/rm-static), "
        "local/jsonfile, a .json/.jsonl/.parquet file, or a folder with train.* and eval.* files. "
        "Several are concatenated. Default: the bundled synthetic sorting task.")
    data_split: str = arg(
        "2,4,4", "Comma-separated weights of the slices given to steps 1, 2 and 3 (disjoint, seeded).")
    data_split_compat: str = arg(
        "none", "How --data_split picks each step's rows: 'none' = our rule (a Python-random permutation per "
        "dataset); 'dschat' = DeepSpeed-Chat's (numpy RandomState(--seed) permutation, rounded cumulative cuts), "
        "so the same --seed and --data_split select the same rows of a dataset as DeepSpeed-Chat does.",
        choices=("none", "dschat"))
    data_output_path: str | None = arg(
        None, "Folder for the tokenized cache. Default: <output_dir>/data_cache (DeepSpeed-Chat "
        "uses /tmp/data_files, a shared world-writable folder; we do not).")
    max_seq_len: int = arg(512, "Maximum tokens per training sequence (prompt + answer).")
    overlength: str = arg(
        "truncate", "What to do with rows longer than --max_seq_len: truncate them (DeepSpeed-Chat's "
        "behaviour) or drop them. Either way the count is logged.", choices=("truncate", "drop"))
    add_eot_token: bool = arg(
        False, "Add --eot_token to the tokenizer as a special token and end every answer with it.")
    eot_token: str = arg("<|endoftext|>", "The end-of-text token used with --add_eot_token.")

    def problems(self) -> list[str]:
        out = []
        try:
            parse_data_split(self.data_split)
        except UserError as err:
            out.append(str(err))
        if self.max_seq_len < 2:
            out.append(f"--max_seq_len must be >= 2 (got {self.max_seq_len})")
        return out


@dataclass
class Step1DataArgs(DataArgs):
    sft_only_data_path: list[str] = arg(
        default_factory=list, help="Datasets used whole by step 1 only (not split between steps). Default: none.")
    train_on_prompt: bool = arg(
        False, "Also put loss on the prompt tokens, as DeepSpeed-Chat does. Default: loss on the "
        "answer tokens only (as TRL and OpenRLHF do), so the model is not trained to write prompts.")


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

    def problems(self) -> list[str]:
        out = _at_least(self, ("per_device_train_batch_size", "per_device_eval_batch_size",
                               "gradient_accumulation_steps", "num_train_epochs"))
        if self.learning_rate <= 0:
            out.append(f"--learning_rate must be > 0 (got {self.learning_rate})")
        if self.num_warmup_steps < 0 or self.test_stop_step < 0:
            out.append("--num_warmup_steps and --test_stop_step must be >= 0")
        return out


@dataclass
class DeepSpeedArgs:
    zero_stage: int = arg(0, "ZeRO stage.", choices=(0, 1, 2, 3))
    offload: bool = arg(False, "Offload optimizer state to CPU (ZeRO >= 2) and parameters (ZeRO 3).")
    dtype: str | None = arg(
        None, choices=("fp16", "bf16", "fp32"),
        help="Training dtype. Default: fp16 on a GPU (DeepSpeed-Chat's default), bf16 on a CPU-only "
        "machine, where DeepSpeed cannot run fp16.")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass.")
    compute_fp32_loss: bool = arg(
        False, "Step 1: compute the loss from fp32 logits (for bf16/fp16 training). Step 2 accepts it for "
        "DeepSpeed-Chat scripts but needs no switch: its reward model always returns fp32 scores, so the loss "
        "is always fp32 (what the flag does in DeepSpeed-Chat). DPO accepts it too and always computes its "
        "log-probs in fp32.")
    logprob_chunk_size: int | None = arg(
        None, "Steps 1 and 3: compute the loss, log-probs and entropy from the last hidden states this many "
        "sequence positions at a time (the LM head and log-softmax per chunk, recomputed in the backward), so no "
        "full (batch, length, vocabulary) fp32 logits tensor is held; 0 uses the full logits. Default: None, "
        "automatic: as many positions as keep one chunk's fp32 logits within 128 MiB (engine.rl.chunked); a "
        "model that is not a transformers causal LM, or whose head is tied to its input embedding, uses the "
        "full logits. Step 2's reward model has no vocabulary head and ignores it.")
    gradient_clipping: float = arg(1.0, "Global gradient-norm clip (DeepSpeed-Chat: 1.0).")
    deepspeed_config: str | None = arg(
        None, "A DeepSpeed JSON config (see ds_configs/). Its \"auto\" values are filled from the "
        "flags; explicit values are kept. Default: none, the config is built from the flags.")
    deepspeed: bool = arg(False, "Accepted for DeepSpeed-Chat launch scripts; DeepSpeed is always on.")
    local_rank: int = arg(-1, "Set by the launcher; ignored (LOCAL_RANK from the environment wins).")

    def problems(self) -> list[str]:
        out = []
        if self.offload and self.zero_stage < 2:
            out.append("--offload needs --zero_stage 2 or 3; DeepSpeed ignores offload below stage 2")
        if self.gradient_clipping < 0:
            out.append("--gradient_clipping must be >= 0 (0 disables clipping)")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 0:
            out.append("--logprob_chunk_size must be >= 0 (0 uses the full logits; leave it out for automatic)")
        return out


@dataclass
class LoRAArgs:
    lora_dim: int = arg(0, "LoRA rank; > 0 enables LoRA (peft).")
    lora_module_name: str = arg(
        "auto", "LoRA goes on the Linear layers whose name contains this string. 'auto': every "
        "Linear layer of the decoder stack, for any model family. DeepSpeed-Chat's default "
        "'decoder.layers.' matches OPT only.")
    only_optimize_lora: bool = arg(
        False, "Train only the LoRA weights; the base model stays frozen. Without it, as in DeepSpeed-Chat, the "
        "weights of the Linear layers that get LoRA stay frozen and everything else trains beside the adapters "
        "(embeddings, norms, biases, the output head, Linear layers without LoRA).")
    lora_learning_rate: float = arg(5e-4, "Learning rate of the LoRA weights.")
    lora_scaling: float = arg(
        1.0, "LoRA output scale numerator: the update is multiplied by lora_scaling / lora_dim "
        "(DeepSpeed-Chat's convention; peft's lora_alpha).")

    def problems(self) -> list[str]:
        out = []
        if self.lora_dim < 0:
            out.append(f"--lora_dim must be >= 0 (got {self.lora_dim}); 0 disables LoRA")
        if self.only_optimize_lora and self.lora_dim == 0:
            out.append("--only_optimize_lora needs --lora_dim > 0")
        if not self.lora_module_name:
            out.append("--lora_module_name is empty; use 'auto' or a name fragment like 'layers.'")
        if self.lora_learning_rate <= 0:
            out.append(f"--lora_learning_rate must be > 0 (got {self.lora_learning_rate})")
        if self.lora_scaling <= 0:
            out.append(f"--lora_scaling must be > 0 (got {self.lora_scaling})")
        return out


@dataclass
class LogArgs:
    output_dir: str = arg("output/step1_sft", "Where the model, checkpoints, metrics and plots go.")
    enable_tensorboard: bool = arg(False, "Write TensorBoard events.")
    tensorboard_path: str = arg(
        "step1_tensorboard", _tensorboard_help("step1_model"))
    # The last folder of a --tensorboard_path you give (DeepSpeed-Chat's DeepSpeed tensorboard job name).
    tensorboard_job: ClassVar[str] = "step1_model"
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
    verbose: bool = arg(
        False, "Also show DeepSpeed's INFO lines (its configuration, timers); RLHF_ENGINE_VERBOSE=1 does the "
        "same and reaches the step through a launch script. Warnings and errors show either way.")

    def problems(self) -> list[str]:
        out = []
        if self.save_interval < 0 or self.print_interval < 1:
            out.append("--save_interval must be >= 0 and --print_interval >= 1")
        if self.save_total_limit < 0:
            out.append(f"--save_total_limit must be >= 0 (got {self.save_total_limit})")
        if self.save_total_limit and not self.save_interval:
            out.append("--save_total_limit needs --save_interval > 0 (no checkpoints are written without it)")
        return out


@dataclass
class FaultArgs:
    peer_timeout: float = arg(
        180.0, "Seconds a rank may go without a heartbeat before the others presume it dead and stop, "
        "naming it (0: no watchdog; collectives then wait for DeepSpeed's 30-minute timeout).")
    startup_timeout: float = arg(
        300.0, "Seconds a rank may take to join the others at start-up (the rendezvous at MASTER_ADDR:MASTER_PORT, "
        "the process group's connections, the peer watchdog's store); then it stops, naming the master address and "
        "what to check (0: no limit of ours; torch's store then waits DeepSpeed's 10 minutes). Time spent building "
        "DeepSpeed's ops on this machine does not count.")
    max_bad_steps: int = arg(
        10, "Stop after this many consecutive bad steps: a NaN or inf loss or reward, or an update the "
        "optimizer skipped (fp16 loss-scale overflow). 0: never stop.")

    def problems(self) -> list[str]:
        if self.peer_timeout < 0 or self.max_bad_steps < 0 or self.startup_timeout < 0:
            return ["--peer_timeout, --startup_timeout and --max_bad_steps must be >= 0"]
        return []


class StepConfig:
    """What the three step configs share: the flags the user gave, and the checks of all parts."""

    # The flat flag names given on the command line or in the --config file (set by engine.flags;
    # a class attribute, not a field: it is neither a part nor saved).
    given: frozenset[str] = frozenset()

    def problems(self) -> list[str]:
        """Every problem of the config (pure): each part's, then those that span parts."""
        out: list[str] = []
        for part in dataclasses.fields(self):
            out += getattr(self, part.name).problems()
        return out + self.cross_part_problems()

    def cross_part_problems(self) -> list[str]:
        return []


@dataclass
class Step1Config(StepConfig):
    """Step 1: supervised fine-tuning."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: Step1DataArgs = field(default_factory=Step1DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    ds: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    log: LogArgs = field(default_factory=LogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)


# ----------------------------------------------------------------------------------------------
# Step 2
# ----------------------------------------------------------------------------------------------
@dataclass
class RewardTrainArgs(TrainArgs):
    learning_rate: float = arg(5e-5, "Peak learning rate (DeepSpeed-Chat's step-2 default).")
    eval_interval: int = arg(
        0, "Also evaluate every N optimizer steps (0: only before training and after each epoch).")
    eval_iters: int = arg(100, "Evaluate on at most this many batches per rank.")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.eval_interval < 0 or self.eval_iters < 1:
            out.append("--eval_interval must be >= 0 and --eval_iters >= 1")
        return out


@dataclass
class RewardArgs:
    num_padding_at_beginning: int = arg(
        1, "Accepted for DeepSpeed-Chat scripts (leading tokens that equal the pad id yet are real: OPT's BOS). "
        "Not needed in training: step 2's batches carry the tokenizer's attention mask, so a BOS equal to the "
        "pad id is never taken for padding; only rw_eval.py, which rebuilds masks from ids, uses it.")
    rm_loss: str = arg(
        "end", "Pairwise loss: 'end' = Bradley-Terry on the end scores (as TRL and OpenRLHF; the score "
        "step 3 uses), 'span' = DeepSpeed-Chat's per-token loss over the span where chosen and rejected "
        "differ (DeepSpeed-Chat's only loss: --rm_loss span for its behaviour).", choices=("end", "span"))
    rm_margin: float = arg(0.0, "Required score gap: loss = -logsigmoid(chosen - rejected - margin).")
    rm_l2_coef: float = arg(
        0.0, "Adds coef * mean((chosen + rejected)^2), which centres scores on 0 (0: off).")

    def problems(self) -> list[str]:
        if self.num_padding_at_beginning < 0 or self.rm_margin < 0 or self.rm_l2_coef < 0:
            return ["--num_padding_at_beginning, --rm_margin and --rm_l2_coef must be >= 0"]
        return []


@dataclass
class RewardLogArgs(LogArgs):
    output_dir: str = arg("output/step2_reward", "Where the model, checkpoints, metrics and plots go.")
    tensorboard_path: str = arg(
        "step2_tensorboard", _tensorboard_help("step2_model"))
    tensorboard_job: ClassVar[str] = "step2_model"


@dataclass
class Step2Config(StepConfig):
    """Step 2: reward model."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: RewardTrainArgs = field(default_factory=RewardTrainArgs)
    ds: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    reward: RewardArgs = field(default_factory=RewardArgs)
    log: RewardLogArgs = field(default_factory=RewardLogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)


# ----------------------------------------------------------------------------------------------
# Step 2, the DPO alternative (step2_dpo/main.py): learns from the pairs directly, no reward model, no PPO
# ----------------------------------------------------------------------------------------------
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")  # engine.rl.dpo.LOSSES (engine.rl imports no config)


@dataclass
class DPOTrainArgs(RewardTrainArgs):
    learning_rate: float = arg(1e-3, "Peak learning rate (DeepSpeed-Chat's DPO default; its OPT-350m scripts pass "
                               "5e-5, its Llama-2-7B scripts 9.65e-6).")


@dataclass
class DPOArgs:
    dpo_loss: str = arg(
        "sigmoid", "The loss: sigmoid = DPO (with --label_smoothing: conservative DPO, DeepSpeed-Chat's and "
        "OpenRLHF's), ipo, hinge (SLiC), robust (rDPO), simpo (reference-free, length-normalised; no reference "
        "model at all). Formulas in docs/step2_dpo.md.", choices=DPO_LOSSES)
    beta: float = arg(0.1, "DPO's beta, the strength of the pull towards the reference (DeepSpeed-Chat, OpenRLHF "
                      "and TRL: 0.1); for simpo the reward scale (the SimPO paper: 2 to 2.5).")
    label_smoothing: float = arg(
        0.0, "The assumed chance that a pair's preference is wrong, in [0, 0.5): conservative DPO with sigmoid "
        "(DeepSpeed-Chat's flag), the unbiased loss with robust, smoothing with simpo (0: plain DPO).")
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin (TRL's default, 0.5).")
    nll_coef: float = arg(
        0.0, "Add this times the chosen answer's negative log-likelihood per token (OpenRLHF's --nll_loss_coef, "
        "Llama 3's recipe); 0: none.")
    reference_model: str = arg(
        "auto", "How the frozen reference is held: copy = a frozen copy of the starting model (ZeRO-3 when the "
        "policy is, else whole; --offload_reference_model, --reference_quantization); adapters_off = the policy "
        "with its LoRA adapters switched off (no second copy; needs --lora_dim > 0 and --only_optimize_lora, so "
        "that the base stays the starting model); auto = adapters_off when that holds and no flag asks for a "
        "held copy (--offload_reference_model, --reference_quantization), else copy.",
        choices=("auto", "copy", "adapters_off"))
    precompute_ref_logps: bool = arg(
        False, "Compute the reference's log-probs of every pair in one pass before training, cache them beside the "
        "tokenized data (keyed by data, tokenizer and reference model), then drop the reference: no reference in "
        "memory while training (TRL's precompute_ref_log_probs).")
    offload_reference_model: bool = arg(
        False, "Offload the frozen copy's parameters to CPU (DeepSpeed-Chat's flag; needs --zero_stage 3, under "
        "which the copy is partitioned like the policy).")
    reference_quantization: str = arg(
        "none", "Load the frozen copy's Linear weights with bitsandbytes: 8bit (LLM.int8) or 4bit (NF4), whole on "
        "every rank. Its log-probs then differ from the starting model's by the rounding, so the loss does not "
        "start at log 2.", choices=("none", "8bit", "4bit"))
    num_padding_at_beginning: int = arg(
        1, "Accepted for DeepSpeed-Chat's DPO sweep script, which passes step 2's flag set (DeepSpeed-Chat's own "
        "DPO main.py refuses it). Not needed: DPO's batches carry the tokenizer's attention mask, so a BOS equal "
        "to the pad id (OPT's) is never taken for padding.")
    auto_fit: bool = arg(
        False, "Let the memory planner (python -m engine.planner --step dpo) choose the memory settings you did "
        "not set (ZeRO stage, offload, LoRA, gradient checkpointing, how the reference is held, the batch size up "
        "to the given one) for this machine's GPUs; flags you set, on the command line or in --config, are kept.")

    def problems(self) -> list[str]:
        out = []
        if self.beta <= 0:
            out.append(f"--beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"--label_smoothing must be in [0, 0.5) (got {self.label_smoothing}); give the chance that a "
                       "label is wrong (0.5 or more: the labels would carry no preference)")
        elif self.label_smoothing and self.dpo_loss in ("ipo", "hinge"):
            out.append(f"--label_smoothing has no meaning for --dpo_loss {self.dpo_loss}; use sigmoid, robust or "
                       "simpo, or drop it")
        if self.nll_coef < 0:
            out.append(f"--nll_coef must be >= 0 (got {self.nll_coef})")
        if self.num_padding_at_beginning < 0:
            out.append(f"--num_padding_at_beginning must be >= 0 (got {self.num_padding_at_beginning})")
        if self.offload_reference_model and self.reference_quantization != "none":
            out.append("--offload_reference_model and --reference_quantization exclude each other: offloading moves "
                       "ZeRO-3 partitions to the CPU, and a quantized reference is not partitioned; drop one of them")
        return out


@dataclass
class DPOLogArgs(LogArgs):
    output_dir: str = arg("output/step2_dpo", "Where the model, checkpoints, metrics and plots go.")
    # DeepSpeed-Chat's DPO main kept step 2's TensorBoard names.
    tensorboard_path: str = arg(
        "step2_tensorboard", _tensorboard_help("step2_model"))
    tensorboard_job: ClassVar[str] = "step2_model"


@dataclass
class DPOConfig(StepConfig):
    """Step 2, DPO: a policy trained on preference pairs against a frozen reference."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: DPOTrainArgs = field(default_factory=DPOTrainArgs)
    ds: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    dpo: DPOArgs = field(default_factory=DPOArgs)
    log: DPOLogArgs = field(default_factory=DPOLogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)

    @property
    def reference_free(self) -> bool:
        return self.dpo.dpo_loss == "simpo"

    @property
    def reference_mode(self) -> str:
        """'none' (simpo), 'copy' or 'adapters_off': --reference_model with auto resolved."""
        if self.reference_free:
            return "none"
        if self.dpo.reference_model != "auto":
            return self.dpo.reference_model
        # A DeepSpeed-Chat command line with --offload_reference_model asks for a held copy, so auto keeps it.
        wants_copy = self.dpo.offload_reference_model or self.dpo.reference_quantization != "none"
        frozen_base = self.lora.lora_dim > 0 and self.lora.only_optimize_lora
        return "adapters_off" if frozen_base and not wants_copy else "copy"

    def cross_part_problems(self) -> list[str]:
        dpo, out = self.dpo, []
        if dpo.reference_model == "adapters_off" and not (self.lora.lora_dim > 0 and self.lora.only_optimize_lora):
            out.append("--reference_model adapters_off needs --lora_dim > 0 and --only_optimize_lora (with the base "
                       "training too, the policy without adapters is no longer the starting model); add them or use "
                       "--reference_model copy")
        if self.reference_mode != "copy" and (dpo.offload_reference_model or dpo.reference_quantization != "none"):
            out.append("--offload_reference_model and --reference_quantization set how a frozen copy is held, and "
                       f"this run has none (reference: {self.reference_mode}); drop them or add --reference_model copy")
        elif dpo.offload_reference_model and self.ds.zero_stage != 3:
            out.append("--offload_reference_model needs --zero_stage 3 (the reference is partitioned like the "
                       "policy; DeepSpeed offloads parameters only under ZeRO-3)")
        if self.reference_free and dpo.precompute_ref_logps:
            out.append("--precompute_ref_logps has nothing to compute with --dpo_loss simpo, which uses no reference; "
                       "drop it")
        return out


# ----------------------------------------------------------------------------------------------
# Step 3: per-role parts generated from the shared ones
# ----------------------------------------------------------------------------------------------
class RoleTwins:
    """Base of the parts `role_twins` generates: the shared part's view per role, and its checks."""

    shared: ClassVar[type]
    per_role: ClassVar[tuple[str, ...]]
    dropped: ClassVar[tuple[str, ...]]
    any_role: ClassVar[tuple[str, ...]]

    def view(self, role: str = ROLES[0]) -> Any:
        """The shared part of `role` (its `{role}_x` fields as `x`; dropped fields at their defaults)."""
        values = {name: getattr(self, own) for name, own in self._view_names(role)}
        return self.shared(**{k: list(v) if isinstance(v, list) else v for k, v in values.items()})  # lists copied

    @classmethod
    @functools.cache
    def _view_names(cls, role: str) -> tuple[tuple[str, str], ...]:
        """(the shared part's field, this part's field) of `role`."""
        return tuple((f.name, f"{role}_{f.name}" if f.name in cls.per_role else f.name)
                     for f in dataclasses.fields(cls.shared) if f.name not in cls.dropped)

    def problems(self) -> list[str]:
        """The shared part's checks for each role, with the role's flag names; a problem several roles
        share is one line naming each role's flag. A check on an `any_role` flag fails only when it
        fails for every role."""
        found = {role: self.view(role).problems() for role in ROLES}
        out: list[str] = []
        for text in dict.fromkeys(t for texts in found.values() for t in texts):
            failing = [role for role in ROLES if text in found[role]]
            if not any(f"--{name}" in text for name in self.any_role):
                out.append(self._role_flags(text, failing, " and "))
            elif len(failing) == len(ROLES):
                out.append(self._role_flags(text, failing, " or "))
        return out

    @classmethod
    def _role_flags(cls, text: str, roles: Sequence[str], joiner: str) -> str:
        for name in cls.per_role:
            text = re.sub(rf"--{name}\b", joiner.join(f"--{r}_{name}" for r in roles), text)
        return text


def role_twins(shared: type, per_role: Sequence[str] = (), drop: Sequence[str] = (),
               any_role: Sequence[str] = (), **overrides: Any) -> type:
    """A dataclass to build a step-3 part on, with the fields of the `shared` part in its order: each
    field in `per_role` once per role (`lora_dim` -> `actor_lora_dim`, `critic_lora_dim`; its help
    prefixed with the role), the others once as they are, those in `drop` not at all. `overrides`
    give a generated field another default and help (`arg(...)`) or only another help (a string)."""
    hints = typing.get_type_hints(shared)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(shared):
        if f.name in drop:
            continue
        names = [(f"{r}_{f.name}", f"{r.capitalize()}: ") for r in ROLES] if f.name in per_role else [(f.name, "")]
        for name, prefix in names:
            new = overrides.pop(name, None)
            if isinstance(new, str) or new is None:
                help_text = new if isinstance(new, str) else prefix + f.metadata["help"]
                new = dataclasses.field(default=f.default, default_factory=f.default_factory,
                                        metadata={**f.metadata, "help": help_text})
            elif new.metadata.get("choices") is None:
                new.metadata = {**new.metadata, "choices": f.metadata.get("choices")}
            fields.append((name, hints[f.name], new))
    if overrides:
        raise TypeError(f"role_twins({shared.__name__}): no generated field {', '.join(overrides)}")
    attrs = {"shared": shared, "per_role": tuple(per_role), "dropped": tuple(drop), "any_role": tuple(any_role)}
    return dataclasses.make_dataclass(f"{shared.__name__}Twins", fields, bases=(RoleTwins,), namespace=attrs)


@dataclass
class Step3ModelArgs(role_twins(
        ModelArgs, per_role=("model_name_or_path", "dropout"),
        actor_model_name_or_path=arg(
            "./output/step1_sft", "The step-1 (SFT) model folder (where step 1 writes unless told otherwise): "
            "the actor starts from it and the frozen reference is a copy of it.", section="roles"),
        critic_model_name_or_path=arg(
            "./output/step2_reward", "The step-2 reward-model folder (where step 2 writes unless told "
            "otherwise): the frozen reward model and the critic's starting point.", section="roles"))):
    # The defaults start with "./": a folder relative to the working directory, never a hub name such as
    # owner "output" (engine/models/paths.py), so a missing one is refused at once with the way out.
    num_padding_at_beginning: int = arg(
        1, "Accepted for DeepSpeed-Chat scripts (OPT's BOS equals its pad id). Step 3 carries real "
        "attention masks from the prompts and generation, so no count of leading pads is needed.")

    def problems(self) -> list[str]:
        return super().problems() + _at_least(self, ("num_padding_at_beginning",), 0)


@dataclass
class Step3DataArgs(role_twins(
        DataArgs, drop=("max_seq_len", "overlength"),
        data_path="Prompt datasets (any step-1/step-2 format, or rows with only a prompt). A row's other "
        "fields (e.g. answer, ground_truth) are kept as columns for the reward functions. "
        "Default: the bundled synthetic sorting task.",
        data_split="Comma-separated weights of the slices given to steps 1, 2 and 3; step 3 uses the third.")):
    prompt_column_map: str = arg(
        "", "Rename the fields of local prompt files before they are read: comma-separated field=name "
        "pairs, e.g. question=prompt for GSM8K (whose prompt field is 'question'). Default: no renaming.")
    max_prompt_seq_len: int = arg(
        256, "Prompts are left-padded to this many tokens; longer prompts are dropped and counted.")
    max_answer_seq_len: int = arg(256, "Most tokens generated per answer.", section="generation")
    unsupervised_dataset_name: str | None = arg(
        None, "PTX: a pretraining-style dataset mixed into the actor's updates (a hub name with "
        "--unsupervised_dataset_config_name, or a local .txt/.json/.jsonl/.parquet file or folder). "
        "Default: none, no PTX.")
    unsupervised_dataset_config_name: str | None = arg(
        None, "The hub dataset's config name (e.g. wikitext-2-raw-v1 for wikitext). Default: none.")
    unsup_coef: float = arg(
        27.8, "Weight of the PTX language-modelling loss (InstructGPT's value, DeepSpeed-Chat's default).")
    preprocessing_num_workers: int | None = arg(
        None, "Processes for tokenizing the PTX dataset (datasets' num_proc). Default: this process alone.")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.max_prompt_seq_len < 1 or self.max_answer_seq_len < 1:
            out.append("--max_prompt_seq_len and --max_answer_seq_len must be >= 1")
        if self.unsupervised_dataset_config_name and not self.unsupervised_dataset_name:
            out.append("--unsupervised_dataset_config_name needs --unsupervised_dataset_name")
        if self.unsup_coef < 0:
            out.append(f"--unsup_coef must be >= 0 (got {self.unsup_coef})")
        try:
            parse_column_map(self.prompt_column_map)
        except UserError as err:
            out.append(str(err))
        return out


@dataclass
class Step3TrainArgs(role_twins(
        TrainArgs, per_role=("learning_rate", "weight_decay"),
        drop=("per_device_train_batch_size", "per_device_eval_batch_size"),
        actor_learning_rate=arg(9.65e-6, "Peak learning rate of the actor."),
        critic_learning_rate=arg(5e-6, "Peak learning rate of the critic."),
        num_train_epochs="Passes over the step-3 prompts.",
        gradient_accumulation_steps="PPO micro-batches per optimizer step. When a PPO step has fewer micro-batches "
        "than this (or not a multiple), the step collects more generation batches (a multiple of "
        "--generation_batches) until its micro-batches fill whole windows, as DeepSpeed-Chat accumulates "
        "across experience batches; the log says how many.",
        num_warmup_steps=arg(100, "Warm-up optimizer steps of the schedules (DeepSpeed-Chat: 100)."),
        test_stop_step="Stop after this many PPO steps without changing the schedule (0: run to the end).",
        seed="Seed of the data split, shuffling, sampling, dropout and the built-in model. DeepSpeed-Chat's step 3 "
        "has no default seed (each run differs); its llama2 scripts pass --seed 1234, this default.")):
    per_device_generation_batch_size: int = arg(16, "Prompts per rank per generation batch.")
    per_device_training_batch_size: int = arg(16, "Sequences per rank per PPO micro-batch.")
    generation_batches: int = arg(
        1, "Generation batches collected before the PPO updates that use them (one PPO step).")
    ppo_epochs: int = arg(1, "Passes of PPO updates over each step's experience.")
    enable_test_mode: bool = arg(
        False, "Accepted for DeepSpeed-Chat scripts, not needed here: --test_stop_step alone stops the run "
        "(DeepSpeed-Chat needs both). Given without --test_stop_step it is refused, since it would change nothing.")

    def problems(self) -> list[str]:
        out = super().problems()
        sizes = _at_least(self, ("per_device_generation_batch_size", "per_device_training_batch_size",
                                 "generation_batches", "ppo_epochs"))
        out += sizes
        if self.enable_test_mode and self.test_stop_step == 0:
            out.append("--enable_test_mode needs --test_stop_step > 0 (the PPO step to stop after)")
        return out

    def batch_problems(self, samples_per_prompt: int) -> list[str]:
        """Whether the rows of a generation batch (prompts x `samples_per_prompt`, per rank) cut into whole
        micro-batches and the micro-batches of a step into whole optimizer windows (a cross-part check: the
        rows depend on --n_samples_per_prompt)."""
        sizes = ("per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches")
        if any(getattr(self, n) < 1 for n in sizes) or self.gradient_accumulation_steps < 1 or samples_per_prompt < 1:
            return []
        gen, micro = self.per_device_generation_batch_size, self.per_device_training_batch_size
        rows = gen * samples_per_prompt
        if rows % micro and samples_per_prompt == 1:
            return [f"--per_device_generation_batch_size {gen} must be a multiple of "
                    f"--per_device_training_batch_size {micro} (each generation batch is cut into PPO micro-batches)"]
        if rows % micro:
            valid = [d for d in range(1, rows + 1) if rows % d == 0]
            return [f"a generation batch holds {gen} prompts x --n_samples_per_prompt {samples_per_prompt} = {rows} "
                    f"answers per rank, which --per_device_training_batch_size {micro} does not divide; use one of "
                    f"{', '.join(map(str, valid))} (or change --per_device_generation_batch_size)"]
        return []

    def step_generation_batches(self, samples_per_prompt: int) -> int:
        """Generation batches one PPO step collects: --generation_batches, times the fewest rounds of them whose
        micro-batches fill whole --gradient_accumulation_steps windows. DeepSpeed-Chat accumulates across
        experience batches (its optimizer steps only at the window's end, so the next batch is generated by
        the same weights); collecting those batches into one PPO step does the same updates and keeps each
        loss a token mean over its window (engine.rl.batch_mean), which needs the window's counts up front."""
        rows = self.per_device_generation_batch_size * samples_per_prompt
        micro = rows * self.generation_batches // self.per_device_training_batch_size
        accum = self.gradient_accumulation_steps
        return self.generation_batches * (accum // math.gcd(micro, accum))


@dataclass
class PPOArgs:
    kl_ctl: float = arg(0.1, "Per-token KL penalty coefficient (the initial one with --target_kl).")
    kl_estimator: str = arg(
        "k1", "Per-token KL estimate: k1 = log p - log p_ref (DeepSpeed-Chat), k2 = (log ratio)^2 / 2, "
        "k3 = exp(r) - 1 - r (never negative).", choices=("k1", "k2", "k3"))
    target_kl: float | None = arg(
        None, "Adaptive KL controller (Ziegler et al.): steer the KL per sequence towards this value. "
        "Default: unset, a fixed --kl_ctl.")
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
    do_sample: bool = arg(
        True, "Sample answers (off: greedy decoding). DeepSpeed-Chat differs: it leaves this to the model's "
        "generation_config (greedy for OPT) and forces greedy for Llama; --no-do_sample gives its behaviour.",
        section="generation")
    temperature: float = arg(1.0, "Sampling temperature.", section="generation")
    top_p: float = arg(1.0, "Nucleus sampling: keep the smallest token set with this probability mass.",
                       section="generation")
    top_k: int = arg(
        0, "Sample among the k most likely tokens (0: all). transformers' generate() default, which DeepSpeed-Chat "
        "keeps when a model samples, is 50: --top_k 50 for that.", section="generation")
    enable_ema: bool = arg(False, "Keep an exponential moving average of the actor, saved as actor_ema/.",
                           section="training")
    ema_decay: float = arg(0.992, "EMA decay: ema = decay * ema + (1 - decay) * actor after each actor update.",
                           section="training")
    align_overflow: bool = arg(
        False, "fp16: when the actor or the critic overflows, skip both optimizer steps.", section="training")
    eval_interval: int = arg(
        0, "Also evaluate the actor (answers to held-out prompts: reward score, length, and the "
        "rule-checked success rate where the data defines one) every N PPO steps (0: before and after training).",
        section="evaluation")
    eval_prompts: int = arg(
        256, "Held-out prompts per evaluation (all ranks together, at most). 0: no evaluation at all, as in "
        "DeepSpeed-Chat's step 3 (which never evaluates); the held-out prompts are then not needed.",
        section="evaluation")
    eval_greedy: bool = arg(
        False, "Evaluate greedy answers. Default: answers decoded as in the rollouts (what PPO optimises), "
        "with a fixed seed so every evaluation sees the same sampling noise.", section="evaluation")
    warn_kl_above: float = arg(
        10.0, "Log a warning when the mean KL to the reference per sequence exceeds this (nats).", section="logging")

    def problems(self) -> list[str]:
        out = []
        if self.kl_ctl < 0 or self.entropy_coef < 0:
            out.append("--kl_ctl and --entropy_coef must be >= 0")
        if self.target_kl is not None and self.target_kl <= 0:
            out.append("--target_kl must be > 0 (or left unset for a fixed --kl_ctl)")
        if self.warn_kl_above <= 0:
            out.append("--warn_kl_above must be > 0")
        out += _at_least(self, ("kl_horizon",))
        if self.clip_reward_value <= 0 or self.cliprange <= 0 or self.cliprange_value <= 0:
            out.append("--clip_reward_value, --cliprange and --cliprange_value must be > 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            out.append("--gamma and --lam must be in [0, 1]")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            out.append("--temperature must be > 0, --top_p in (0, 1] and --top_k >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            out.append(f"--ema_decay must be in [0, 1] (got {self.ema_decay})")
        if self.eval_interval < 0 or self.eval_prompts < 0:
            out.append("--eval_interval and --eval_prompts must be >= 0")
        if self.eval_interval and not self.eval_prompts:
            out.append(f"--eval_interval {self.eval_interval} asks for evaluations that --eval_prompts 0 turns off; "
                       "drop one of them")
        return out


# The names of engine.rl (kept here as literals so the config imports no torch; a unit test keeps them equal).
ESTIMATOR_NAMES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class RLArgs:
    """Critic-free RL (issue 16): the advantage estimator, groups, KL as a loss, policy-loss options, DAPO's
    parts and reward functions. Defaults: today's PPO (gae, one answer per prompt, no KL loss)."""

    advantage_estimator: str = arg(
        "gae", "gae: PPO with a critic (DeepSpeed-Chat). The others train no critic: grpo (group mean and std), "
        "dr_grpo (group mean, no std), rloo (leave-one-out mean), reinforce_pp (batch-whitened returns, one answer "
        "per prompt is fine), reinforce_pp_baseline (group mean, then batch whitening), remax (baseline: the reward "
        "of one extra greedy answer per prompt).", choices=ESTIMATOR_NAMES)
    n_samples_per_prompt: int = arg(
        1, "Answers sampled per prompt (a group); group estimators need >= 2 (verl's examples use 5, TRL 8).")
    grpo_std_normalize: bool = arg(
        True, "grpo: divide by the group's reward std (GRPO's paper; --no-grpo_std_normalize is Dr. GRPO's choice).")
    kl_loss_coef: float = arg(
        0.0, "Weight of a KL(actor || reference) term in the actor loss, on answer tokens (0: off, TRL's default; "
        "verl's GRPO examples use 0.001). --kl_ctl is the separate in-reward penalty.")
    kl_loss_estimator: str = arg(
        "k3", "Estimator of the KL loss: k1, k2, k3 (verl's low_var_kl, its default) or k3+ (k3's value with k2's "
        "gradient, straight-through).", choices=("k1", "k2", "k3", "k3+"))
    cliprange_low: float | None = arg(
        None, "Lower ratio clip epsilon (1 - low). Default: --cliprange (ppo) or 3e-4 (gspo, the GSPO paper's).")
    cliprange_high: float | None = arg(
        None, "Upper ratio clip epsilon (1 + high); DAPO's clip-higher uses 0.28. Default: --cliprange (ppo) or "
        "4e-4 (gspo).")
    dual_clip_c: float | None = arg(
        None, "Dual clip (Ye et al. 2020): bound the loss of negative-advantage tokens at c x advantage; verl uses "
        "3.0. Default: off.")
    policy_loss: str = arg(
        "ppo", "ppo: one importance ratio per token. gspo: one per answer (the geometric mean of its token "
        "ratios, GSPO), which needs --loss_agg_mode seq-mean-token-mean.", choices=("ppo", "gspo"))
    loss_agg_mode: str = arg(
        "token-mean", "How per-token losses become one (verl's names): token-mean (over every answer token of the "
        "optimizer step on all ranks, DAPO's), seq-mean-token-mean (GRPO's paper), seq-mean-token-sum, "
        "seq-mean-token-sum-norm (token sums / --max_answer_seq_len, Dr. GRPO's).", choices=LOSS_AGG_MODES)
    dynamic_sampling: bool = arg(
        False, "DAPO: drop groups whose rewards are all equal and refill from further prompt batches, up to "
        "--max_gen_batches per step.")
    max_gen_batches: int = arg(
        3, "With --dynamic_sampling, most prompt batches generated per generation batch (verl's "
        "max_num_gen_batches; a step that cannot fill trains on what it has and logs it).")
    overlong_buffer_len: int = arg(
        0, "DAPO overlong shaping: answers longer than --max_answer_seq_len minus this get a linear penalty "
        "(0: off; DAPO used 4096 of 20480).")
    overlong_penalty_factor: float = arg(1.0, "The overlong penalty at --max_answer_seq_len (DAPO: 1.0).")
    mask_truncated_answers: bool = arg(
        False, "Leave answers cut at --max_answer_seq_len (no eos) out of the loss (TRL's mask_truncated_completions).")
    reward_funcs: list[str] = arg(
        None, "Reward functions: path/to/file.py:function or package.module:function, called as "
        "fn(prompts, completions, **columns) -> list of float or None (TRL's signature). Built-ins: "
        "engine.rewards.builtin:sort_rule, engine.rewards.builtin:gsm8k_answer. Given alone (without "
        "--critic_model_name_or_path), no reward model is loaded. Default: none, the reward model scores.",
        default_factory=list)
    reward_weights: list[float] = arg(
        None, "One weight per --reward_funcs entry. A reward model, when also loaded, is one more term with "
        "weight 1. Default: all 1.0.", default_factory=list)

    @property
    def group_estimator(self) -> bool:
        return self.advantage_estimator in GROUP_ESTIMATORS

    def problems(self) -> list[str]:
        out = _at_least(self, ("n_samples_per_prompt", "max_gen_batches"))
        if self.group_estimator and self.n_samples_per_prompt == 1:
            out.append(f"--advantage_estimator {self.advantage_estimator} compares the answers of one prompt: set "
                       "--n_samples_per_prompt 2 or more (e.g. 4), or use reinforce_pp or remax")
        if self.kl_loss_coef < 0 or self.overlong_buffer_len < 0 or self.overlong_penalty_factor < 0:
            out.append("--kl_loss_coef, --overlong_buffer_len and --overlong_penalty_factor must be >= 0")
        for name in ("cliprange_low", "cliprange_high"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                out.append(f"--{name} must be > 0 (or unset for the default)")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            out.append(f"--dual_clip_c must be > 1 (got {self.dual_clip_c}); verl uses 3.0")
        if self.policy_loss == "gspo" and self.loss_agg_mode != "seq-mean-token-mean":
            out.append(f"--policy_loss gspo has one ratio per answer and needs --loss_agg_mode seq-mean-token-mean "
                       f"(got {self.loss_agg_mode}), as in verl")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            out.append(f"--reward_weights has {len(self.reward_weights)} values but --reward_funcs names "
                       f"{len(self.reward_funcs)} functions; give one weight per function, or none for all 1.0")
        if self.dynamic_sampling and not self.group_estimator:
            out.append("--dynamic_sampling drops groups of equal rewards: it needs a group estimator (grpo, dr_grpo, "
                       "rloo, reinforce_pp_baseline) and --n_samples_per_prompt >= 2")
        return out


@dataclass
class Step3DeepSpeedArgs(role_twins(
        DeepSpeedArgs, per_role=("zero_stage", "gradient_checkpointing"),
        actor_zero_stage="ZeRO stage of the actor (the reference follows: 3 if this is 3, else 0).",
        critic_zero_stage="ZeRO stage of the critic (the reward model follows: 3 if this is 3, else 0).",
        offload="Offload the actor's and critic's optimizer state (and ZeRO-3 parameters) to CPU.",
        dtype="Dtype of all four roles. Default: fp16 on a GPU (DeepSpeed-Chat's default), bf16 on a CPU-only "
        "machine, where DeepSpeed cannot run fp16.",
        compute_fp32_loss="Accepted for DeepSpeed-Chat scripts: step 3 always computes log-probs and losses in fp32.",
        gradient_clipping="Global gradient-norm clip of both trained roles.",
        deepspeed_config="A DeepSpeed JSON config for the trained roles; its \"auto\" values are filled from "
        "the flags. Default: none, the configs are built from the flags.")):
    offload_reference_model: bool = arg(
        False, "Offload the reference model's parameters to CPU (ZeRO-3 actor).", section="roles")
    offload_reward_model: bool = arg(
        False, "Offload the reward model's parameters to CPU (ZeRO-3 critic).", section="roles")
    enable_hybrid_engine: bool = arg(
        False, "Generate with the hybrid train/generate mode: the actor's ZeRO-3 shards gathered once "
        "per generation batch, LoRA fused, KV cache, any model family, CPU too.", section="generation")
    unpin_actor_parameters: bool = arg(
        False, "Hybrid mode under ZeRO-3: do not hold the gathered actor for the whole generation; "
        "gather layer by layer per token instead (less memory, much slower).", section="generation")
    release_inference_cache: bool = arg(
        False, "Hybrid mode: return the generation's cached memory (KV cache) to the device after each "
        "generation batch.", section="generation")
    inference_tp_size: int = arg(
        1, "Accepted for DeepSpeed-Chat scripts; values > 1 have no effect here (with a warning): there is no "
        "tensor-parallel generation, the hybrid mode gathers whole layers on every rank, so each rank holds the "
        "full actor while generating (--unpin_actor_parameters lowers that memory).", section="generation")
    tp_gather_partition_size: int = arg(
        8, "Accepted for DeepSpeed-Chat scripts, no effect here (with a warning when set): DeepSpeed's layers "
        "gathered at a time for tensor-parallel generation, which this engine does not do.", section="generation")
    enable_mixed_precision_lora: bool = arg(
        False, "MixZ++: quantize the actor's frozen base weights under ZeRO-3 with LoRA (DeepSpeed's 8-bit kernel). "
        "Needs a CUDA GPU: on a CPU it is accepted for DeepSpeed-Chat scripts with a warning and has no effect (the "
        "base stays in --dtype). Works with --enable_hybrid_engine: the hybrid mode folds LoRA into the gathered, "
        "dequantized copies and leaves the stored 8-bit weights as they were.")
    actor_quantization: str = arg(
        "none", "QLoRA: load the actor's base Linear weights in 4-bit NF4 (bitsandbytes, computing in --dtype), "
        "frozen, and train LoRA adapters on them. Needs --actor_lora_dim > 0, --only_optimize_lora and "
        "--actor_zero_stage 0-2; pair with --reference_quantization 4bit, or the KL also measures the base's "
        "rounding. The saved actor/ is full precision (the base re-read from the actor folder, LoRA merged).",
        choices=("none", "4bit"), section="roles")
    reference_quantization: str = arg(
        "none", "Load the frozen reference's Linear weights with bitsandbytes: 8bit (LLM.int8) or 4bit (NF4). "
        "A quantized reference is whole on every rank (ZeRO cannot partition it), even with --actor_zero_stage 3.",
        choices=("none", "8bit", "4bit"), section="roles")
    reward_quantization: str = arg(
        "none", "Load the frozen reward model's Linear weights with bitsandbytes: 8bit (LLM.int8) or 4bit (NF4); "
        "its value head stays in --dtype. Whole on every rank, even with --critic_zero_stage 3.",
        choices=("none", "8bit", "4bit"), section="roles")
    auto_fit: bool = arg(
        False, "Let the memory planner (python -m engine.planner) choose the memory settings you did not "
        "set (ZeRO stages, offload, LoRA, gradient checkpointing, quantized roles, hybrid mode, batch "
        "sizes up to the given ones) for this machine's GPUs; flags you set, on the command line or in "
        "--config, are kept.")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.offload_reference_model and self.actor_zero_stage != 3:
            out.append("--offload_reference_model needs --actor_zero_stage 3 (the reference is partitioned "
                       "like the actor; DeepSpeed offloads parameters only under ZeRO-3)")
        if self.offload_reward_model and self.critic_zero_stage != 3:
            out.append("--offload_reward_model needs --critic_zero_stage 3 (the reward model is partitioned "
                       "like the critic; DeepSpeed offloads parameters only under ZeRO-3)")
        out += _at_least(self, ("inference_tp_size", "tp_gather_partition_size"))
        for name in ("unpin_actor_parameters", "release_inference_cache"):
            if getattr(self, name) and not self.enable_hybrid_engine:
                out.append(f"--{name} is a hybrid-mode setting; add --enable_hybrid_engine")
        if self.actor_quantization != "none" and self.actor_zero_stage == 3:
            out.append(f"--actor_quantization {self.actor_quantization} needs --actor_zero_stage 0, 1 or 2: ZeRO-3 "
                       "cannot partition bitsandbytes weights (the 4-bit base is whole on every rank)")
        for role, flag in (("reference", "offload_reference_model"), ("reward", "offload_reward_model")):
            if getattr(self, f"{role}_quantization") != "none" and getattr(self, flag):
                out.append(f"--{role}_quantization and --{flag} exclude each other: offloading moves ZeRO-3 "
                           f"partitions to the CPU, and a quantized {role} model is not partitioned; drop one of them")
        return out


# --only_optimize_lora freezes the base of the roles that have LoRA, so one LoRA role is enough.
@dataclass
class Step3LoRAArgs(role_twins(
        LoRAArgs, per_role=("lora_dim", "lora_module_name", "lora_learning_rate"), any_role=("only_optimize_lora",),
        actor_lora_module_name="Actor Linear layers whose name contains this get LoRA ('auto': every decoder "
        "Linear layer; on OPT the same layers as DeepSpeed-Chat's default 'decoder.layers.', which matches no "
        "other family).",
        critic_lora_module_name="Critic Linear layers whose name contains this get LoRA ('auto': every decoder "
        "Linear layer; on OPT the same layers as DeepSpeed-Chat's default 'decoder.layers.', which matches no "
        "other family).",
        only_optimize_lora="Train only the LoRA weights (and the critic's value head). Without it, as in "
        "DeepSpeed-Chat, the weights of the Linear layers that get LoRA stay frozen and everything else trains "
        "beside the adapters (embeddings, norms, biases, the output head, Linear layers without LoRA).",
        lora_scaling="LoRA output scale numerator (update x lora_scaling / lora_dim).")):
    pass


@dataclass
class Step3LogArgs(LogArgs):
    output_dir: str = arg("output/step3_rlhf", "Where actor/, critic/, actor_ema/, checkpoints, metrics and plots go.")
    tensorboard_path: str = arg(
        "step3_tensorboard", _tensorboard_help("step3_model"))
    tensorboard_job: ClassVar[str] = "step3_model"
    print_interval: int = arg(1, "Log a summary line every N PPO steps.")
    save_interval: int = arg(
        0, "Every N PPO steps write checkpoint-<step>/{actor,critic} and the state --resume reads (0: only "
        "the final models).")
    print_answers: bool = arg(False, "Print a prompt and its generated answer from every rank.")
    print_answers_interval: int = arg(1, "With --print_answers, every N PPO steps.")

    def problems(self) -> list[str]:
        return super().problems() + _at_least(self, ("print_answers_interval",))


@dataclass
class Step3Config(StepConfig):
    """Step 3: PPO RLHF with actor, critic, reference and reward model."""

    model: Step3ModelArgs = field(default_factory=Step3ModelArgs)
    data: Step3DataArgs = field(default_factory=Step3DataArgs)
    train: Step3TrainArgs = field(default_factory=Step3TrainArgs)
    ppo: PPOArgs = field(default_factory=PPOArgs)
    rl: RLArgs = field(default_factory=RLArgs)
    ds: Step3DeepSpeedArgs = field(default_factory=Step3DeepSpeedArgs)
    lora: Step3LoRAArgs = field(default_factory=Step3LoRAArgs)
    log: Step3LogArgs = field(default_factory=Step3LogArgs)
    fault: FaultArgs = field(default_factory=FaultArgs)

    # Per-role views in the shared parts' types, for the loaders steps 1 and 2 use.
    def role_model(self, role: str) -> ModelArgs:
        """ModelArgs of 'actor' or 'critic' (the reference and reward model load like them)."""
        return self.model.view(role)

    def role_lora(self, role: str) -> LoRAArgs:
        return self.lora.view(role)

    def data_args(self) -> DataArgs:
        """The step-3 data flags as DataArgs (for the shared split, cache and tokenizer code)."""
        return self.data.view()

    # What step 3 builds (roles, checkpoints and the planner ask these).
    @property
    def critic_free(self) -> bool:
        """No critic: every estimator but PPO's gae."""
        return self.rl.advantage_estimator != "gae"

    @property
    def needs_reference(self) -> bool:
        """The frozen reference exists only for a KL term (in the reward or in the loss)."""
        return not (self.ppo.kl_ctl == 0 and self.rl.kl_loss_coef == 0)

    @property
    def needs_reward_model(self) -> bool:
        """No reward model when --reward_funcs score alone: given without --critic_model_name_or_path."""
        return not self.rl.reward_funcs or "critic_model_name_or_path" in self.given

    @property
    def needs_critic_folder(self) -> bool:
        """Whether the step-2 folder is read at all (for the critic or the reward model)."""
        return not self.critic_free or self.needs_reward_model

    @property
    def step_generation_batches(self) -> int:
        """Generation batches per PPO step (Step3TrainArgs.step_generation_batches)."""
        return self.train.step_generation_batches(self.rl.n_samples_per_prompt)

    def compat_notices(self, cuda: bool) -> list[str]:
        """Warnings for DeepSpeed-Chat flags this engine accepts but cannot honour here (step 3 logs them);
        `cuda`: whether this machine has a CUDA GPU."""
        out = []
        if self.ds.enable_mixed_precision_lora and not cuda:
            out.append("--enable_mixed_precision_lora has no effect without a CUDA GPU (DeepSpeed's quantized ZeRO-3 "
                       "weights have no CPU kernels): the actor's frozen base stays in --dtype, about twice the "
                       "memory of its 8-bit form")
        if self.ds.inference_tp_size > 1 or "tp_gather_partition_size" in self.given:
            out.append(f"--inference_tp_size {self.ds.inference_tp_size} and --tp_gather_partition_size "
                       f"{self.ds.tp_gather_partition_size} have no effect: there is no tensor-parallel generation "
                       "here; the hybrid mode gathers whole layers, so each rank holds the full actor while generating "
                       "(more memory than DeepSpeed-Chat's TP slices; --unpin_actor_parameters lowers it)")
        return out

    def cross_part_problems(self) -> list[str]:
        out: list[str] = self.train.batch_problems(self.rl.n_samples_per_prompt)
        ds, lora, ppo = self.ds, self.lora, self.ppo
        if ds.enable_mixed_precision_lora:
            if lora.actor_lora_dim == 0 or ds.actor_zero_stage != 3:
                out.append("--enable_mixed_precision_lora needs --actor_lora_dim > 0 and --actor_zero_stage 3")
        if ds.actor_quantization != "none" and (lora.actor_lora_dim == 0 or not lora.only_optimize_lora):
            out.append(f"--actor_quantization {ds.actor_quantization} (QLoRA) trains LoRA adapters on a frozen "
                       "quantized base: add --actor_lora_dim 8 (or another rank > 0) and --only_optimize_lora")
        if ppo.align_overflow and ds.dtype != "fp16":
            out.append("--align_overflow is about fp16 loss-scale overflow; bf16 and fp32 never overflow, "
                       "so use it only with --dtype fp16")
        elif ppo.align_overflow and min(ds.actor_zero_stage, ds.critic_zero_stage) < 1:
            out.append("--align_overflow needs --actor_zero_stage and --critic_zero_stage >= 1 (it reads the "
                       "ZeRO optimizers' overflow flags)")
        return out + self._rl_problems()

    def _rl_problems(self) -> list[str]:
        rl, out = self.rl, []
        if rl.advantage_estimator == "gae" and rl.n_samples_per_prompt > 1:
            out.append("--n_samples_per_prompt > 1 forms groups, which only critic-free estimators use; pick one with "
                       "--advantage_estimator (e.g. grpo) or sample 1 answer per prompt")
        if rl.reward_funcs and not self.critic_free:
            out.append("--reward_funcs score answers for the critic-free estimators; PPO's gae scores with the "
                       "reward model: add --advantage_estimator (e.g. grpo with --n_samples_per_prompt 4) or drop "
                       "--reward_funcs")
        if self.critic_free and not rl.reward_funcs and rl.reward_weights:
            out.append("--reward_weights needs --reward_funcs")
        if self.ppo.align_overflow and self.critic_free:
            out.append("--align_overflow aligns the actor's and the critic's steps; there is no critic with "
                       f"--advantage_estimator {rl.advantage_estimator}")
        if rl.advantage_estimator != "gae" and not self.ppo.do_sample and rl.n_samples_per_prompt > 1:
            out.append("--no-do_sample makes every answer of a group the same; keep sampling on for groups")
        return out
