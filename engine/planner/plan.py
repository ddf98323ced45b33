"""Per-rank, per-phase memory of a step-3 run, and the search for the cheapest settings that fit.

A plan is a `Workload` (the actor's and critic's shapes, sequence lengths, ranks, and the algorithm:
advantage estimator, answers per prompt, whether a reference and a reward model exist) and `Knobs` (the
step-3 flags that move memory). `predict` adds, for each phase, the model states every role that exists
holds (`model_states`) to that phase's transient tensors (`activations`). A critic-free estimator
(anything but PPO's gae) has no critic: no critic states, no critic forward, no critic_train phase. The
rollout has N rows per prompt with `n_samples_per_prompt` N, and remax adds one greedy answer per prompt
(generated and scored, not trained on):

- generate: the actor's KV cache for prompt + answer of every rollout row, one layer's prefill working set, and what the
  hybrid mode adds (ZeRO-3: the whole gathered actor; with LoRA below ZeRO-3: fused copies of the
  LoRA-targeted weights);
- experience: the larger of the actor's / reference's scoring forward (log-probs from full logits)
  and the critic's / reward model's forward, plus the stored experience of the trained rows;
- actor_train / critic_train: a PPO micro-batch's activations (with or without gradient
  checkpointing), the actor's logits;
- workspace, in every phase: ZeRO's gradient-reduction buffers (the trained parameters' count, at
  most DeepSpeed's 5e8 elements; two under ZeRO-1/2 with overlap_comm, fp32 under ZeRO-1) and the
  ZeRO-3 prefetch bucket (3e7 elements in our configs).

Bytes are per rank, split into accelerator and host; GB are GiB (2**30 bytes), as torch reports them.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import ESTIMATOR_NAMES, Step3Config
from engine.flags import build_config, leaf_fields
from engine.planner.activations import (
    inference_activation_bytes,
    kv_cache_bytes,
    logits_bytes,
    training_activation_bytes,
)
from engine.planner.model_states import Bytes, frozen_role, trained_role
from engine.planner.shapes import ModelShape
from engine.runtime.ds_config import DTYPE_BYTES, STAGE3_BUCKET, frozen_zero_stage, reduce_bucket_elements

GiB = 2**30
PHASES = ("generate", "experience", "actor_train", "critic_train")
EXPERIENCE_FLOATS = 12        # fp32 values per token that step 3 keeps per experience (log-probs, values, ...)


def algorithm_of(cfg: Step3Config) -> dict[str, Any]:
    """The `Workload` fields a step-3 config's algorithm sets: its estimator, answers per prompt, and
    whether it builds a reference and a reward model (the config's own predicates)."""
    return {"advantage_estimator": cfg.rl.advantage_estimator, "n_samples_per_prompt": cfg.rl.n_samples_per_prompt,
            "reference": cfg.needs_reference, "reward_model": cfg.needs_reward_model}


def _default(flag: str) -> Any:
    """A step-3 flag's default, from its config field (one source for both)."""
    return leaf_fields(Step3Config)[flag][1].default


@dataclass(frozen=True)
class Workload:
    """What a run does: the models, sequence lengths and ranks, and the algorithm (defaults: today's PPO)."""

    actor: ModelShape
    critic: ModelShape          # the critic's and reward model's shape (a one-label sequence classifier)
    max_prompt_seq_len: int
    max_answer_seq_len: int
    world_size: int = 1
    generation_batches: int = 1
    advantage_estimator: str = _default("advantage_estimator")  # gae: PPO with a critic; the others have none
    n_samples_per_prompt: int = _default("n_samples_per_prompt")  # rollout rows per prompt
    reference: bool = True      # False with no KL term (Step3Config.needs_reference)
    reward_model: bool = True   # False with reward functions only (Step3Config.needs_reward_model)

    def __post_init__(self) -> None:
        if self.advantage_estimator not in ESTIMATOR_NAMES:
            raise ValueError(f"advantage_estimator must be one of {', '.join(ESTIMATOR_NAMES)}, "
                             f"not {self.advantage_estimator!r}")
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"n_samples_per_prompt must be >= 1, not {self.n_samples_per_prompt}")

    @property
    def tokens(self) -> int:
        return self.max_prompt_seq_len + self.max_answer_seq_len

    @property
    def critic_free(self) -> bool:
        return self.advantage_estimator != "gae"

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases of a step: no critic_train without a critic."""
        return tuple(p for p in PHASES if not (p == "critic_train" and self.critic_free))

    def trained_rows(self, prompts: int) -> int:
        """Sequences per rank that `prompts` prompts per rank give to train on: N answers each."""
        return prompts * self.n_samples_per_prompt

    def rollout_rows(self, prompts: int) -> int:
        """Sequences per rank generated (and scored by the reward) for `prompts` prompts: remax adds one
        greedy answer per prompt, its baseline."""
        return self.trained_rows(prompts) + (prompts if self.advantage_estimator == "remax" else 0)


@dataclass(frozen=True)
class Knobs:
    """The memory-relevant step-3 flags, named as the flags are, with their defaults."""

    actor_zero_stage: int = _default("actor_zero_stage")
    critic_zero_stage: int = _default("critic_zero_stage")
    offload: bool = _default("offload")
    offload_reference_model: bool = _default("offload_reference_model")
    offload_reward_model: bool = _default("offload_reward_model")
    actor_gradient_checkpointing: bool = _default("actor_gradient_checkpointing")
    critic_gradient_checkpointing: bool = _default("critic_gradient_checkpointing")
    actor_lora_dim: int = _default("actor_lora_dim")
    critic_lora_dim: int = _default("critic_lora_dim")
    only_optimize_lora: bool = _default("only_optimize_lora")
    reference_quantization: str = _default("reference_quantization")
    reward_quantization: str = _default("reward_quantization")
    actor_quantization: str = _default("actor_quantization")
    enable_hybrid_engine: bool = _default("enable_hybrid_engine")
    enable_ema: bool = _default("enable_ema")
    per_device_generation_batch_size: int = _default("per_device_generation_batch_size")
    per_device_training_batch_size: int = _default("per_device_training_batch_size")
    logprob_chunk_size: int | None = _default("logprob_chunk_size")
    dtype: str = "bf16"  # step 3's default is the machine's (fp16 on a GPU); a plan is for any machine

    def problems(self) -> list[str]:
        """Why step 3 would refuse these flags (empty when it accepts them): the config's own checks."""
        return list(_refusals(self))

    def flags(self) -> str:
        """The step-3 command-line flags that set these knobs (defaults left out, except batch and dtype)."""
        default = Knobs()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                if value:
                    parts.append(f"--{f.name}")
            elif value != getattr(default, f.name) or f.name.startswith("per_device") or f.name == "dtype":
                parts.append(f"--{f.name} {value}")
        return " ".join(parts)


@functools.lru_cache(maxsize=65536)  # a search and its retries try the same few thousand knobs
def _refusals(knobs: Knobs) -> tuple[str, ...]:
    values = {f.name: getattr(knobs, f.name) for f in dataclasses.fields(knobs)}
    return tuple(build_config(Step3Config, values).problems())


@dataclass
class Prediction:
    """Bytes per rank: `roles[role][part]` (model states) and `phases[phase][part]` (everything)."""

    roles: dict[str, dict[str, Bytes]]
    phases: dict[str, dict[str, Bytes]] = field(default_factory=dict)

    def peak(self, phase: str, merge_host: bool = False) -> float:
        """GiB per rank in `phase`: the accelerator's, or (merge_host, a CPU-only run) all of it."""
        total = sum(self.phases[phase].values(), Bytes())
        return (total.gpu + total.cpu if merge_host else total.gpu) / GiB

    def peak_gb(self, merge_host: bool = False) -> dict[str, float]:
        """GiB per rank of each phase the step has (no critic_train without a critic), in step order."""
        return {p: self.peak(p, merge_host) for p in self.phases}

    def host_gb(self) -> float:
        """Host GiB per rank for the offloaded states (the same in every phase)."""
        return max(sum(parts.values(), Bytes()).cpu for parts in self.phases.values()) / GiB

    def to_json(self, merge_host: bool = False) -> dict[str, Any]:
        def gb(x: Bytes) -> dict[str, float]:
            return {"gpu": round(x.gpu / GiB, 3), "cpu": round(x.cpu / GiB, 3)}

        return {"peak_gb": {k: round(v, 3) for k, v in self.peak_gb(merge_host).items()},
                "host_gb": round(self.host_gb(), 3),
                "phases": {p: {k: gb(v) for k, v in parts.items()} for p, parts in self.phases.items()},
                "roles": {r: {k: gb(v) for k, v in parts.items()} for r, parts in self.roles.items()}}


def role_states(work: Workload, knobs: Knobs) -> dict[str, dict[str, Bytes]]:
    """Model-state bytes per rank of every role the run builds (`model_states`), as `engine.models.roles`
    builds them: no critic when critic-free, no reference without KL, no reward model with functions only."""
    a, c, k, n = work.actor, work.critic, knobs, work.world_size
    lora_a, lora_c = a.lora_params(k.actor_lora_dim), c.lora_params(k.critic_lora_dim)
    common = dict(dtype=k.dtype, world_size=n)
    roles: dict[str, dict[str, Bytes]] = {}

    # Parameters each trained role's optimizer holds: the adapters (+ the critic's value head) with
    # --only_optimize_lora, else all of them but the adapted Linear weights (`trainable_params`).
    trainable_a = lora_a if k.only_optimize_lora and lora_a else a.trainable_params(k.actor_lora_dim)
    trainable_c = lora_c + c.hidden_size if k.only_optimize_lora and lora_c else c.trainable_params(k.critic_lora_dim)

    def trained(shape: ModelShape, lora: int, trainable: int, stage: int) -> dict[str, Bytes]:
        return trained_role(shape.params + lora, trainable, shape.largest_layer_params, zero_stage=stage,
                            offload=k.offload, offload_params=k.offload and stage == 3, **common)

    if k.actor_quantization != "none":
        # QLoRA: a whole 4-bit base on every rank; only the adapters are DeepSpeed's to partition.
        base = frozen_role(a.params, a.linear_params, a.linear_rows, a.largest_layer_params, zero_stage=0,
                           quantization=k.actor_quantization, **common)["parameters"]
        adapters = trained_role(lora_a, lora_a, 0, zero_stage=k.actor_zero_stage, offload=k.offload, **common)
        roles["actor"] = adapters | {"parameters": adapters["parameters"] + base}
    else:
        roles["actor"] = trained(a, lora_a, trainable_a, k.actor_zero_stage)
    if not work.critic_free:
        roles["critic"] = trained(c, lora_c, trainable_c, k.critic_zero_stage)

    def frozen(shape: ModelShape, extra: int, follows: int, offload: bool, quantization: str) -> dict[str, Bytes]:
        stage = frozen_zero_stage(follows, quantization)
        return frozen_role(shape.params + extra, shape.linear_params, shape.linear_rows, shape.largest_layer_params,
                           zero_stage=stage, offload_params=offload and stage == 3, quantization=quantization,
                           **common)

    if work.reference:
        roles["reference"] = frozen(a, 0, k.actor_zero_stage, k.offload_reference_model, k.reference_quantization)
    if work.reward_model:
        roles["reward"] = frozen(c, 0, k.critic_zero_stage, k.offload_reward_model, k.reward_quantization)
    if k.enable_ema:
        roles["ema"] = frozen(a, lora_a, k.actor_zero_stage, k.offload_reference_model, k.actor_quantization)
    # ZeRO's gradient-reduction buffers (sized to the trained parameters by engine.runtime.run, at most
    # DeepSpeed's 5e8 elements; ZeRO-1/2 keep two with overlap_comm, ZeRO-1's in fp32) and the ZeRO-3
    # prefetch bucket live as long as the engines.
    engines = [(k.actor_zero_stage, a, trainable_a)] + ([] if work.critic_free else
                                                         [(k.critic_zero_stage, c, trainable_c)])
    work_bytes = sum(engine_buffer_bytes(stage, shape.params, trainable, k.dtype)
                     for stage, shape, trainable in engines)
    roles["workspace"] = {"buffers": Bytes(gpu=work_bytes)}
    return roles


def engine_buffer_bytes(zero_stage: int, params: int, trainable: int, dtype: str) -> float:
    """Bytes of one trained engine's ZeRO buffers: gradient reduction (sized to the trained parameters, at most
    DeepSpeed's 5e8 elements; two under ZeRO-1/2 with overlap_comm, fp32 under ZeRO-1) and the ZeRO-3
    prefetch bucket."""
    b, bucket = DTYPE_BYTES[dtype], reduce_bucket_elements(trainable)
    if zero_stage in (1, 2):
        return 2 * (4 if zero_stage == 1 else b) * bucket
    if zero_stage == 3:
        return b * bucket + b * min(STAGE3_BUCKET, params)
    return 0.0


def predict(work: Workload, knobs: Knobs) -> Prediction:
    """Bytes per rank of each phase of a step-3 step (see the module docstring)."""
    a, c, k = work.actor, work.critic, knobs
    b, t, p = DTYPE_BYTES[k.dtype], work.tokens, work.max_prompt_seq_len
    bt = k.per_device_training_batch_size
    # rows per rank: generated (and scored by the critic / reward model), and trained on
    prompts = k.per_device_generation_batch_size
    bg, bs = work.rollout_rows(prompts), work.trained_rows(prompts)
    roles = role_states(work, k)
    states = {f"{r}.{part}": v for r, parts in roles.items() for part, v in parts.items()}
    # DeepSpeed frees the gradients after each optimizer step: they exist in the training phases only.
    no_grads = {key: v for key, v in states.items() if not key.endswith(".gradients")}
    experience_store = Bytes(gpu=EXPERIENCE_FLOATS * 4 * bs * t * work.generation_batches)

    hybrid = Bytes()
    if k.enable_hybrid_engine and k.actor_zero_stage == 3 and k.actor_quantization == "none":
        whole = b * (a.params + a.lora_params(k.actor_lora_dim))
        hybrid = Bytes(gpu=whole if k.offload else whole * (1 - 1 / work.world_size))
    elif k.enable_hybrid_engine and k.actor_lora_dim > 0:
        hybrid = Bytes(gpu=b * a.linear_params)  # LoRA folded into new copies of the target weights

    generate = {"kv_cache": Bytes(gpu=kv_cache_bytes(a, k.dtype, bg, t)),
                "activations": Bytes(gpu=inference_activation_bytes(a, k.dtype, bg, p)
                                     + logits_bytes(a, k.dtype, bg, 1, "generate")),
                "hybrid_gather": hybrid, "experience_store": experience_store}
    scored = bg if "critic" in roles or "reward" in roles else 0
    score_logits = logits_bytes(a, k.dtype, bs, t, "score", k.logprob_chunk_size)
    scoring = max(inference_activation_bytes(a, k.dtype, bs, t) + score_logits,
                  inference_activation_bytes(c, k.dtype, scored, t))
    experience = {"activations": Bytes(gpu=scoring), "experience_store": experience_store}
    actor_train = {"activations": Bytes(gpu=training_activation_bytes(a, k.dtype, bt, t, k.actor_gradient_checkpointing)
                                        + logits_bytes(a, k.dtype, bt, t, "train", k.logprob_chunk_size)),
                   "experience_store": experience_store}
    critic_train = {"activations": Bytes(gpu=training_activation_bytes(c, k.dtype, bt, t,
                                                                       k.critic_gradient_checkpointing)),
                    "experience_store": experience_store}
    phases = {"generate": no_grads | generate, "experience": no_grads | experience,
              "actor_train": states | actor_train, "critic_train": states | critic_train}
    return Prediction(roles, {ph: phases[ph] for ph in work.phases})


# -- search ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    num_gpus: int
    gpu_memory_gb: float
    host_memory_gb: float       # per node
    gpus_per_node: int = 8
    usable_fraction: float = 0.9  # of each GPU: CUDA context, communication buffers, fragmentation

    @property
    def usable_gb(self) -> float:
        return self.gpu_memory_gb * self.usable_fraction

    @property
    def ranks_per_node(self) -> int:
        return min(self.num_gpus, self.gpus_per_node)


@dataclass
class Choice:
    knobs: Knobs
    prediction: Prediction
    cost: tuple

    def fits(self, hw: Hardware) -> bool:
        return (max(self.prediction.peak_gb().values()) <= hw.usable_gb
                and self.prediction.host_gb() * hw.ranks_per_node <= hw.host_memory_gb * hw.usable_fraction)


# Values the search tries for each knob the user left free, cheapest first.
SEARCH_SPACE: dict[str, tuple] = {
    "offload": (False, True),
    "offload_reference_model": (False, True),
    "offload_reward_model": (False, True),
    "reference_quantization": ("none", "8bit", "4bit"),
    "reward_quantization": ("none", "8bit", "4bit"),
    "actor_quantization": ("none", "4bit"),
    "lora": (False, True),
    "gradient_checkpointing": (False, True),
    "zero_stage": (0, 1, 2, 3),
    "enable_hybrid_engine": (True, False),
}
QUANT_COST = {"none": 0, "8bit": 1, "4bit": 2}


def _candidates(fixed: dict[str, Any], lora_rank: int, work: Workload) -> Iterator[Knobs]:
    """Every knob combination that agrees with `fixed` (flag name -> value), batch sizes left to fill.
    The knobs of roles `work` does not build stay at their defaults unless fixed."""
    def options(name: str) -> tuple:
        return (fixed[name],) if name in fixed else SEARCH_SPACE[name]

    unused = _unused_knobs(work)
    seen: set[Knobs] = set()

    lora_fixed = {f: fixed[f] for f in ("actor_lora_dim", "critic_lora_dim", "only_optimize_lora") if f in fixed}
    stage_pins = [fixed.get("actor_zero_stage"), fixed.get("critic_zero_stage")]
    for (offload, off_ref, off_rw, q_ref, q_rw, q_actor, lora, ckpt, stage, hybrid) in itertools.product(
            options("offload"), options("offload_reference_model"), options("offload_reward_model"),
            options("reference_quantization"), options("reward_quantization"), options("actor_quantization"),
            (None,) if lora_fixed else SEARCH_SPACE["lora"], SEARCH_SPACE["gradient_checkpointing"],
            SEARCH_SPACE["zero_stage"], options("enable_hybrid_engine")):
        values = dict(offload=offload, offload_reference_model=off_ref, offload_reward_model=off_rw,
                      reference_quantization=q_ref, reward_quantization=q_rw, actor_quantization=q_actor,
                      enable_hybrid_engine=hybrid, actor_zero_stage=stage_pins[0] if stage_pins[0] is not None
                      else stage, critic_zero_stage=stage_pins[1] if stage_pins[1] is not None else stage,
                      actor_gradient_checkpointing=fixed.get("actor_gradient_checkpointing", ckpt),
                      critic_gradient_checkpointing=fixed.get("critic_gradient_checkpointing", ckpt))
        if lora is None:
            values |= lora_fixed
        else:
            values |= dict(actor_lora_dim=lora_rank if lora else 0, critic_lora_dim=lora_rank if lora else 0,
                           only_optimize_lora=lora)
        values |= {f: v for f, v in fixed.items() if f in ("enable_ema", "dtype", "logprob_chunk_size")}
        values |= {f: v for f, v in unused.items() if f not in fixed}
        knobs = Knobs(**values)
        if knobs in seen or _pointless(knobs) or knobs.problems():  # seen: equal once unused knobs are reset
            continue
        seen.add(knobs)
        yield knobs


def _unused_knobs(work: Workload) -> dict[str, Any]:
    """The knobs of the roles `work` does not build, at their defaults (they change no memory)."""
    defaults = Knobs()
    names: list[str] = []
    if work.critic_free:  # --critic_zero_stage stays the actor's: it places the reward model, and --offload
        names += ["critic_lora_dim", "critic_gradient_checkpointing"]  # asks for stage >= 2 of both
    if not work.reference:
        names += ["offload_reference_model", "reference_quantization"]
    if not work.reward_model:
        names += ["offload_reward_model", "reward_quantization"]
    return {n: getattr(defaults, n) for n in names}


def _pointless(k: Knobs) -> bool:
    """Combinations equal in memory to a cheaper one (flags that do nothing at these stages)."""
    return ((k.offload_reference_model and k.actor_zero_stage != 3)
            or (k.offload_reward_model and k.critic_zero_stage != 3)
            or (not k.enable_hybrid_engine and k.actor_zero_stage != 3 and k.actor_lora_dim == 0))


def _cost(k: Knobs, shortfall: float) -> tuple:
    """Cheapest first: fewest offloads, fewest quantized roles, no LoRA, the requested batch sizes,
    no gradient checkpointing, the lowest ZeRO stages, the hybrid mode on."""
    return (k.offload + k.offload_reference_model + k.offload_reward_model,
            QUANT_COST[k.reference_quantization] + QUANT_COST[k.reward_quantization] + QUANT_COST[k.actor_quantization],
            k.actor_lora_dim > 0, shortfall, k.actor_gradient_checkpointing + k.critic_gradient_checkpointing,
            k.actor_zero_stage + k.critic_zero_stage, not k.enable_hybrid_engine)


def _halvings(top: int) -> list[int]:
    out = [top]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _largest_batches(work: Workload, knobs: Knobs, hw: Hardware) -> tuple[Knobs, Prediction]:
    """The knobs with the largest generation and then training batch (halving from the requested ones)
    that fit; batch size 1 must fit."""
    def fitting(k: Knobs, phases: tuple[str, ...]) -> Prediction | None:
        pred = predict(work, k)
        return pred if all(pred.peak(ph) <= hw.usable_gb for ph in phases) else None

    ones = dataclasses.replace(knobs, per_device_generation_batch_size=1, per_device_training_batch_size=1)
    gen = next(g for g in _halvings(knobs.per_device_generation_batch_size)
               if fitting(dataclasses.replace(ones, per_device_generation_batch_size=g), ("generate", "experience")))
    k = dataclasses.replace(ones, per_device_generation_batch_size=gen)
    for train in (t for t in _halvings(min(gen, knobs.per_device_training_batch_size)) if gen % t == 0):
        candidate = dataclasses.replace(k, per_device_training_batch_size=train)
        pred = fitting(candidate, work.phases)
        if pred is not None:
            return candidate, pred
    raise AssertionError("batch size 1 was checked to fit")


def search(work: Workload, hw: Hardware, requested: Knobs, fixed: dict[str, Any], lora_rank: int = 64
           ) -> tuple[Choice | None, Choice]:
    """(the cheapest choice that fits or None, the choice that comes closest) over the knobs not in `fixed`.

    `requested` carries the batch sizes (upper bounds), dtype and EMA; `fixed` maps flag names the
    user set to their values, which the search keeps. Candidates are tried in groups of equal
    offloads, quantization and LoRA, cheapest group first; the first group with a fit is the answer's."""
    base = {f: getattr(requested, f) for f in ("dtype", "enable_ema")}
    candidates = [dataclasses.replace(k, per_device_generation_batch_size=requested.per_device_generation_batch_size,
                                      per_device_training_batch_size=requested.per_device_training_batch_size)
                  for k in _candidates(fixed | base, lora_rank, work)]
    if not candidates:
        raise ValueError("no step-3 flag combination agrees with the fixed flags")
    closest: Choice | None = None
    for _, group in itertools.groupby(sorted(candidates, key=lambda k: _cost(k, 0)[:3]),
                                      key=lambda k: _cost(k, 0)[:3]):
        best: Choice | None = None
        for knobs in group:
            smallest = dataclasses.replace(knobs, per_device_generation_batch_size=1, per_device_training_batch_size=1)
            pred = predict(work, smallest)
            if closest is None or max(pred.peak_gb().values()) < max(closest.prediction.peak_gb().values()):
                closest = Choice(smallest, pred, ())
            if not Choice(smallest, pred, ()).fits(hw):
                continue
            k, pred = _largest_batches(work, knobs, hw)
            shortfall = (math.log2(requested.per_device_generation_batch_size / k.per_device_generation_batch_size)
                         + math.log2(requested.per_device_training_batch_size / k.per_device_training_batch_size))
            choice = Choice(k, pred, _cost(k, shortfall))
            if best is None or choice.cost < best.cost:
                best = choice
        if best is not None:
            return best, best
    return None, closest


# Knobs that are requested values rather than choices; every other knob is the search's to choose.
REQUESTED = ("per_device_generation_batch_size", "per_device_training_batch_size", "dtype", "enable_ema")
LORA_FLAGS = ("actor_lora_dim", "critic_lora_dim")


def couple_lora(fixed: dict[str, Any], lora_rank: int, dims: Sequence[str] = LORA_FLAGS) -> dict[str, Any]:
    """Any LoRA flag fixes the whole LoRA choice: a rank flag (`dims`: step 3's two roles', or the DPO step's
    one) not given is 0, or `lora_rank` for each when only --only_optimize_lora is given."""
    fixed = dict(fixed)
    if any(d in fixed for d in dims):
        fixed.setdefault("only_optimize_lora", False)
        for d in dims:
            fixed.setdefault(d, 0)
    elif "only_optimize_lora" in fixed:
        fixed |= {d: lora_rank if fixed["only_optimize_lora"] else 0 for d in dims}
    return fixed
