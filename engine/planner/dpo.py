"""The memory planner for the DPO step (step 2's alternative to a reward model and PPO): per-rank, per-phase
memory of a run, the search for the cheapest settings that fit, and `plan_dpo`, the DPO main's --auto_fit.

A DPO run trains one model, the policy, on preference pairs: no generation, no critic, no reward model.
Each micro-batch of B pairs is one forward over the 2B sequences (chosen and rejected concatenated), each
up to --max_seq_len tokens. The reference's log-probs come one of three ways (`DPOKnobs.reference_mode`):

- copy: a frozen copy of the policy's starting weights (ZeRO-3 when the policy is, optionally offloaded
  with --offload_reference_model or 8/4-bit with --reference_quantization, as step 3's reference);
- lora: with LoRA and --only_optimize_lora, the policy itself with its adapters switched off (no copy);
- precomputed (--precompute_ref_logps): one no-grad pass of the policy over the data before its first
  update (the policy is the reference then), cached (`engine.data.ref_logps`); no reference in training.

Phases: "reference", the reference's no-grad forward over the 2B sequences (every step; once, before
training, when precomputed) with the policy's states but no gradients, and "train", the policy's forward
and backward over the 2B sequences with every state. Activations and logits follow `activations`; the
logits term is step 3's actor-training one (a forward and backward of log-probs), an upper bound for
DPO's, which reports no entropy.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from engine.config import Step1Config
from engine.errors import UserError
from engine.flags import leaf_fields
from engine.planner.activations import inference_activation_bytes, logits_bytes, training_activation_bytes
from engine.planner.model_states import Bytes, frozen_role, trained_role
from engine.planner.plan import QUANT_COST, Choice, Hardware, Prediction, couple_lora, engine_buffer_bytes
from engine.planner.shapes import ModelShape, model_shape_of
from engine.runtime.ds_config import frozen_zero_stage

REFERENCE_MODES = ("copy", "lora", "precomputed")
DPO_PHASES = ("reference", "train")
QUANTIZATIONS = tuple(QUANT_COST)
LORA_DIMS = ("lora_dim",)  # the DPO step's one LoRA rank flag (`couple_lora`)


def _default(flag: str) -> Any:
    """A flag's default as steps 1 and 2 declare it (the DPO main builds on their parts)."""
    return leaf_fields(Step1Config)[flag][1].default


@dataclass(frozen=True)
class DPOWorkload:
    """What a DPO run does: the policy's shape, the sequence length (prompt + answer), the ranks, and whether
    LoRA with --only_optimize_lora makes the reference the policy with its adapters off (the DPO main's
    rule; True as in TRL and the issue: "with LoRA, the policy with its adapters switched off")."""

    policy: ModelShape
    max_seq_len: int
    world_size: int = 1
    adapter_reference: bool = True

    def __post_init__(self) -> None:
        if self.max_seq_len < 1 or self.world_size < 1:
            raise ValueError("max_seq_len and world_size must be >= 1")


@dataclass(frozen=True)
class DPOKnobs:
    """The memory-relevant DPO flags, named as the flags are. offload_reference_model (DeepSpeed-Chat's DPO
    flag), reference_quantization (step 3's) and precompute_ref_logps (the issue's) are the DPO config's
    own fields; the others are steps 1 and 2's."""

    zero_stage: int = _default("zero_stage")
    offload: bool = _default("offload")
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    lora_dim: int = _default("lora_dim")
    only_optimize_lora: bool = _default("only_optimize_lora")
    offload_reference_model: bool = False
    reference_quantization: str = "none"
    precompute_ref_logps: bool = False
    per_device_train_batch_size: int = _default("per_device_train_batch_size")
    logprob_chunk_size: int | None = _default("logprob_chunk_size")
    dtype: str = "bf16"  # the DPO main's default is the machine's (fp16 on a GPU); a plan is for any machine

    def reference_mode(self, work: DPOWorkload) -> str:
        """Where the reference log-probs come from (see the module docstring)."""
        if self.precompute_ref_logps:
            return "precomputed"
        # A flag that sets how a frozen copy is held asks for one (the DPO config's reference_mode rule).
        wants_copy = self.offload_reference_model or self.reference_quantization != "none"
        if self.lora_dim > 0 and self.only_optimize_lora and work.adapter_reference and not wants_copy:
            return "lora"
        return "copy"

    def problems(self) -> list[str]:
        """Why the DPO main would refuse these flags: the shared parts' checks, and the DPO fields' values."""
        from engine.config import DeepSpeedArgs, LoRAArgs

        out = DeepSpeedArgs(zero_stage=self.zero_stage, offload=self.offload,
                            logprob_chunk_size=self.logprob_chunk_size).problems()
        out += LoRAArgs(lora_dim=self.lora_dim, only_optimize_lora=self.only_optimize_lora).problems()
        if self.reference_quantization not in QUANTIZATIONS:
            out.append(f"--reference_quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.per_device_train_batch_size < 1:
            out.append("--per_device_train_batch_size must be >= 1")
        return out

    def flags(self) -> str:
        """The command-line flags that set these knobs (defaults left out, except the batch size and dtype)."""
        default, parts = DPOKnobs(), []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                parts += [f"--{f.name}"] if value else []
            elif value != getattr(default, f.name) or f.name in ("per_device_train_batch_size", "dtype"):
                parts.append(f"--{f.name} {value}")
        return " ".join(parts)


def dpo_role_states(work: DPOWorkload, k: DPOKnobs) -> dict[str, dict[str, Bytes]]:
    """Model-state bytes per rank: the policy (trained), the reference when it is a copy, and the policy
    engine's ZeRO buffers."""
    p = work.policy
    lora = p.lora_params(k.lora_dim)
    trainable = lora if k.only_optimize_lora and lora else p.trainable_params(k.lora_dim)
    common = dict(dtype=k.dtype, world_size=work.world_size)
    roles = {"policy": trained_role(p.params + lora, trainable, p.largest_layer_params, zero_stage=k.zero_stage,
                                    offload=k.offload, offload_params=k.offload and k.zero_stage == 3, **common)}
    if k.reference_mode(work) == "copy":
        stage = frozen_zero_stage(k.zero_stage, k.reference_quantization)
        roles["reference"] = frozen_role(p.params, p.linear_params, p.linear_rows, p.largest_layer_params,
                                         zero_stage=stage, offload_params=k.offload_reference_model and stage == 3,
                                         quantization=k.reference_quantization, **common)
    roles["workspace"] = {"buffers": Bytes(gpu=engine_buffer_bytes(k.zero_stage, p.params, trainable, k.dtype))}
    return roles


def predict_dpo(work: DPOWorkload, k: DPOKnobs) -> Prediction:
    """Bytes per rank of each phase of a DPO step (see the module docstring)."""
    p, t = work.policy, work.max_seq_len
    rows = 2 * k.per_device_train_batch_size  # chosen and rejected of every pair, in one forward
    roles = dpo_role_states(work, k)
    states = {f"{r}.{part}": v for r, parts in roles.items() for part, v in parts.items()}
    no_grads = {key: v for key, v in states.items() if not key.endswith(".gradients")}
    reference = (inference_activation_bytes(p, k.dtype, rows, t)
                 + logits_bytes(p, k.dtype, rows, t, "score", k.logprob_chunk_size))
    train = (training_activation_bytes(p, k.dtype, rows, t, k.gradient_checkpointing)
             + logits_bytes(p, k.dtype, rows, t, "train", k.logprob_chunk_size))
    return Prediction(roles, {"reference": no_grads | {"activations": Bytes(gpu=reference)},
                              "train": states | {"activations": Bytes(gpu=train)}})


# -- search ----------------------------------------------------------------------------------------

SEARCH_SPACE: dict[str, tuple] = {
    "offload": (False, True),
    "offload_reference_model": (False, True),
    "reference_quantization": QUANTIZATIONS,
    "precompute_ref_logps": (False, True),
    "lora": (False, True),
    "gradient_checkpointing": (False, True),
    "zero_stage": (0, 1, 2, 3),
}
REQUESTED = ("per_device_train_batch_size", "dtype", "logprob_chunk_size")  # requests, not choices
LORA_FLAGS = ("lora_dim", "only_optimize_lora")
Refusal = Callable[[DPOKnobs], list[str]]


def _candidates(work: DPOWorkload, fixed: dict[str, Any], lora_rank: int, refuse: Refusal) -> Iterator[DPOKnobs]:
    """Every knob combination that agrees with `fixed` (flag name -> value) and is neither refused nor
    equal in memory to a cheaper one."""
    def options(name: str) -> tuple:
        return (fixed[name],) if name in fixed else SEARCH_SPACE[name]

    lora_fixed = {f: fixed[f] for f in LORA_FLAGS if f in fixed}
    seen: set[DPOKnobs] = set()
    for offload, off_ref, quant, pre, lora, ckpt, stage in itertools.product(
            *(options(n) for n in ("offload", "offload_reference_model", "reference_quantization",
                                   "precompute_ref_logps")),
            (None,) if lora_fixed else SEARCH_SPACE["lora"], options("gradient_checkpointing"), options("zero_stage")):
        values = dict(zero_stage=stage, offload=offload, gradient_checkpointing=ckpt, offload_reference_model=off_ref,
                      reference_quantization=quant, precompute_ref_logps=pre)
        values |= lora_fixed if lora is None else dict(lora_dim=lora_rank if lora else 0, only_optimize_lora=lora)
        values |= {f: v for f, v in fixed.items() if f in REQUESTED}
        knobs = DPOKnobs(**values)
        if knobs in seen or _pointless(knobs, work, fixed) or knobs.problems() or refuse(knobs):
            continue
        seen.add(knobs)
        yield knobs


def _pointless(k: DPOKnobs, work: DPOWorkload, fixed: dict[str, Any]) -> bool:
    """Reference flags the search would set for nothing: no copy to offload or quantize, or offload below
    ZeRO-3 (kept when the user gave them: DeepSpeed-Chat's scripts pass --offload_reference_model as a habit)."""
    copy = k.reference_mode(work) == "copy"
    zero3_copy = copy and frozen_zero_stage(k.zero_stage, k.reference_quantization) == 3
    return ((k.offload_reference_model and not zero3_copy and "offload_reference_model" not in fixed)
            or (k.reference_quantization != "none" and not copy and "reference_quantization" not in fixed))


def _group(k: DPOKnobs) -> tuple:
    """Candidates are tried in groups, cheapest first: fewest offloads, then no quantized reference, then
    full fine-tuning before LoRA."""
    return k.offload + k.offload_reference_model, QUANT_COST[k.reference_quantization], k.lora_dim > 0


def _cost(k: DPOKnobs, shortfall: float) -> tuple:
    """Within a group: the requested batch size, then no gradient checkpointing (a third more compute), then
    a live reference (precomputing costs a pass before training but no accuracy), then the lowest ZeRO stage."""
    return _group(k) + (shortfall, k.gradient_checkpointing, k.precompute_ref_logps, k.zero_stage)


def _largest_batch(work: DPOWorkload, knobs: DPOKnobs, hw: Hardware) -> tuple[DPOKnobs, Prediction] | None:
    """The knobs with the largest micro-batch (halving from the requested one) that fits, or None."""
    size = knobs.per_device_train_batch_size
    while size >= 1:
        k = dataclasses.replace(knobs, per_device_train_batch_size=size)
        pred = predict_dpo(work, k)
        if Choice(k, pred, ()).fits(hw):
            return k, pred
        size //= 2
    return None


def search_dpo(work: DPOWorkload, hw: Hardware, requested: DPOKnobs, fixed: dict[str, Any], lora_rank: int = 64,
               refuse: Refusal = lambda k: []) -> tuple[Choice | None, Choice]:
    """(the cheapest choice that fits or None, the choice that comes closest) over the knobs not in `fixed`
    (flag name -> value). `requested` carries the batch size (an upper bound), dtype and chunk size;
    `refuse(knobs)` (e.g. the DPO config's own checks) rules candidates out."""
    fixed = fixed | {f: getattr(requested, f) for f in REQUESTED}
    candidates = sorted(_candidates(work, fixed, lora_rank, refuse), key=lambda k: _cost(k, 0))
    if not candidates:
        raise ValueError("no DPO flag combination agrees with the fixed flags")
    closest: Choice | None = None
    for _, group in itertools.groupby(candidates, key=_group):
        best: Choice | None = None
        for knobs in group:
            fitted = _largest_batch(work, knobs, hw)
            if fitted is None:
                smallest = dataclasses.replace(knobs, per_device_train_batch_size=1)
                pred = predict_dpo(work, smallest)
                if closest is None or max(pred.peak_gb().values()) < max(closest.prediction.peak_gb().values()):
                    closest = Choice(smallest, pred, ())
                continue
            k, pred = fitted
            shortfall = math.log2(requested.per_device_train_batch_size / k.per_device_train_batch_size)
            choice = Choice(k, pred, _cost(k, shortfall))
            if best is None or choice.cost < best.cost:
                best = choice
        if best is not None:
            return best, best
    assert closest is not None  # every candidate was tried and none fitted
    return None, closest


# -- a parsed DPO config ---------------------------------------------------------------------------

def _part_of(cfg: Any, name: str) -> Any:
    """The part of a step config (a dataclass of parts) that holds the field `name`, or None."""
    return next((getattr(cfg, p.name) for p in dataclasses.fields(cfg)
                 if any(f.name == name for f in dataclasses.fields(getattr(cfg, p.name)))), None)


def knobs_of(cfg: Any) -> DPOKnobs:
    """The knobs of a parsed DPO config; a knob the config has no field for (or a dtype left to the machine:
    bf16 or fp16, two bytes either way) stays at its default."""
    values = {}
    for f in dataclasses.fields(DPOKnobs):
        part = _part_of(cfg, f.name)
        if part is not None and not (f.name == "dtype" and getattr(part, f.name) is None):
            values[f.name] = getattr(part, f.name)
    return DPOKnobs(**values)


def with_knobs(cfg: Any, knobs: DPOKnobs) -> Any:
    """`cfg` with the knobs' values in the fields it has (its `given` kept)."""
    changes: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(DPOKnobs):
        part = _part_of(cfg, f.name)
        if part is not None:
            name = next(p.name for p in dataclasses.fields(cfg) if getattr(cfg, p.name) is part)
            changes.setdefault(name, {})[f.name] = getattr(knobs, f.name)
    out = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **kw)
                                      for name, kw in changes.items()})
    out.given = getattr(cfg, "given", frozenset())
    return out


def predict_for_dpo(cfg: Any, model_config: Any, world_size: int, adapter_reference: bool = True) -> Prediction:
    """The planner's prediction for a parsed DPO config (its knobs, --max_seq_len) on `world_size` ranks."""
    work = DPOWorkload(model_shape_of(model_config), cfg.data.max_seq_len, world_size, adapter_reference)
    return predict_dpo(work, knobs_of(cfg))


def plan_dpo(cfg: Any, hw: Hardware, model_config: Any, *, adapter_reference: bool = True, lora_rank: int = 64
             ) -> tuple[Any, str]:
    """(`cfg` with the cheapest fitting memory settings, a line saying what was chosen): the DPO main's
    --auto_fit. `cfg` is the parsed DPO config (any step config whose parts hold the DPOKnobs fields it
    has; fields it lacks are never chosen); `model_config` the policy's transformers config; `hw` this
    machine (`engine.planner.step3.this_machine`). Flags the user gave (`cfg.given`) are kept; the batch
    size is an upper bound; candidates the config's own checks refuse are skipped."""
    current = knobs_of(cfg)
    settable = {f.name for f in dataclasses.fields(DPOKnobs) if _part_of(cfg, f.name) is not None}
    given = getattr(cfg, "given", frozenset())
    fixed = {f.name: getattr(current, f.name) for f in dataclasses.fields(DPOKnobs)
             if f.name not in REQUESTED and (f.name in given or f.name not in settable)}
    work = DPOWorkload(model_shape_of(model_config), cfg.data.max_seq_len, hw.num_gpus, adapter_reference)
    try:
        best, closest = search_dpo(work, hw, current, couple_lora(fixed, lora_rank, LORA_DIMS), lora_rank,
                                   refuse=lambda k: with_knobs(cfg, k).problems())
    except ValueError as err:
        raise UserError(f"--auto_fit: {err}; unset some of the memory flags you gave") from None
    if best is None:
        short = max(closest.prediction.peak_gb().values()) - hw.usable_gb
        raise UserError(f"--auto_fit: nothing fits {hw.num_gpus} x {hw.gpu_memory_gb:.0f} GiB; the closest settings "
                        f"({closest.knobs.flags()}) need {short:.1f} GiB more per GPU. Add GPUs, shorten "
                        "--max_seq_len, or unset the memory flags you fixed (python -m engine.planner --step dpo "
                        "shows the breakdown)")
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in best.prediction.peak_gb().items())
    return with_knobs(cfg, best.knobs), (f"--auto_fit chose {best.knobs.flags()} (reference: "
                                         f"{best.knobs.reference_mode(work)}; predicted peak GiB per GPU: {peaks}; "
                                         f"{hw.usable_gb:.1f} usable)")
