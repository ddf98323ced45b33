"""The planner for the DPO step (engine/planner/dpo.py): its phases by hand, the three reference modes, the
search, --auto_fit on a DPO-shaped config, and `python -m engine.planner --step dpo`."""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field

import pytest

from engine.config import DataArgs, DeepSpeedArgs, LoRAArgs, StepConfig, TrainArgs
from engine.errors import UserError
from engine.planner.__main__ import main as planner_main
from engine.planner.dpo import (
    DPOKnobs,
    DPOWorkload,
    dpo_role_states,
    knobs_of,
    plan_dpo,
    predict_dpo,
    search_dpo,
)
from engine.planner.dpo_cli import build_parser
from engine.planner.model_states import Bytes
from engine.planner.plan import Hardware
from engine.planner.shapes import ModelShape, load_config, model_shape_of

# h 8, kv 8, I 16, 2 layers, vocab 10; 4 Linear targets of (8, 8): LoRA rank 2 adds 4 x 2 x 16 = 128.
TOY = ModelShape(params=1000, largest_layer_params=80, lora_targets=((8, 8),) * 4, num_layers=2, hidden_size=8,
                 vocab_size=10, kv_width=8, intermediate_size=16, gated_mlp=True, rms_norm=True)
ONE_PAIR = DPOKnobs(per_device_train_batch_size=1, logprob_chunk_size=0, dtype="bf16")  # full logits


@pytest.fixture(scope="module")
def llama7b() -> ModelShape:
    return model_shape_of(load_config("llama-2-7b"))


def test_phases_by_hand_with_a_frozen_copy():
    # One pair = 2 sequences of 4 tokens = 8 token rows; bf16, ZeRO-0, one rank.
    # policy: parameters 2 x 1000; gradients 2 x 1000 (bf16) + 4 x 1000 (fp32); Adam 8 x 1000 + master 4 x 1000
    # reference copy: 2 x 1000
    pred = predict_dpo(DPOWorkload(TOY, 4), ONE_PAIR)
    assert pred.roles["policy"] == {"parameters": Bytes(2000), "gradients": Bytes(6000), "optimizer": Bytes(12000)}
    assert pred.roles["reference"] == {"parameters": Bytes(2000)}
    # reference: no gradients; one layer's working set (3h + 3I) x 2 = 144 per token x 8 = 1152, and the
    # scoring logits 8 x V x (2 + 8) = 800
    assert pred.peak("reference") * 2**30 == 2000 + 12000 + 2000 + 1152 + 800
    # train: every state; saved activations per token 2 layers x 336 + final norm 48 + h x 2 + 144 = 880, x 8 =
    # 7040; training logits 8 x V x (2 + 16) = 1440
    assert pred.peak("train") * 2**30 == 2000 + 6000 + 12000 + 2000 + 7040 + 1440
    assert list(pred.peak_gb()) == ["reference", "train"]


def test_activations_are_those_of_twice_the_micro_batch():
    work = DPOWorkload(TOY, 4)
    one, three = (predict_dpo(work, dataclasses.replace(ONE_PAIR, per_device_train_batch_size=b)) for b in (1, 3))
    for phase in ("reference", "train"):
        assert three.phases[phase]["activations"].gpu == 3 * one.phases[phase]["activations"].gpu
    # 2 pairs of 2-token sequences = 1 pair of 4-token ones: 8 token rows either way
    two_short = predict_dpo(DPOWorkload(TOY, 2), dataclasses.replace(ONE_PAIR, per_device_train_batch_size=2))
    assert two_short.phases["train"]["activations"] == one.phases["train"]["activations"]


def test_the_three_reference_modes():
    work = DPOWorkload(TOY, 4)
    lora = dataclasses.replace(ONE_PAIR, lora_dim=2, only_optimize_lora=True)
    modes = {"copy": ONE_PAIR, "lora": lora, "precomputed": dataclasses.replace(ONE_PAIR, precompute_ref_logps=True)}
    for mode, knobs in modes.items():
        assert knobs.reference_mode(work) == mode
        assert ("reference" in dpo_role_states(work, knobs)) == (mode == "copy")
    # LoRA training the base weights too cannot switch its adapters off to get the reference: a copy
    assert dataclasses.replace(lora, only_optimize_lora=False).reference_mode(work) == "copy"
    assert lora.reference_mode(DPOWorkload(TOY, 4, adapter_reference=False)) == "copy"
    # adapters only (128 params): parameters 2 x 1128, gradients 2 x 128 + 4 x 128, Adam 12 x 128; no copy
    states = dpo_role_states(work, lora)
    assert states["policy"] == {"parameters": Bytes(2256), "gradients": Bytes(768), "optimizer": Bytes(1536)}
    # precomputed holds exactly the copy's 2000 bytes less than the copy mode, in both phases
    copy, pre = predict_dpo(work, ONE_PAIR), predict_dpo(work, modes["precomputed"])
    for phase in ("reference", "train"):
        assert (copy.peak(phase) - pre.peak(phase)) * 2**30 == 2000


def test_a_quantized_or_offloaded_copy():
    work = DPOWorkload(TOY, 4, world_size=2)
    four_bit = dpo_role_states(work, dataclasses.replace(ONE_PAIR, reference_quantization="4bit"))
    # 4 x 64 Linear weights at half a byte + one fp32 scale per 64; the other 744 params in bf16
    assert four_bit["reference"]["parameters"] == Bytes(256 * 0.5 + 4 * 256 / 64 + 2 * 744)
    offloaded = dpo_role_states(work, dataclasses.replace(ONE_PAIR, zero_stage=3, offload_reference_model=True))
    # ZeRO-3 like the policy: half of 2 x 1000 per rank on the host, the gathered largest module on the GPU
    assert offloaded["reference"]["parameters"] == Bytes(gpu=2 * 80, cpu=1000)


@pytest.mark.parametrize("gpus, memory, mode", [(1, 80, "lora"), (8, 80, "copy"), (4, 24, "copy_or_precomputed")])
def test_search_7b(llama7b, gpus, memory, mode):
    work = DPOWorkload(llama7b, 512, gpus)
    hw = Hardware(gpus, memory, 256 * gpus)
    best, _ = search_dpo(work, hw, DPOKnobs(per_device_train_batch_size=8), {})
    assert best is not None and best.fits(hw) and max(best.prediction.peak_gb().values()) <= 0.9 * memory
    k = best.knobs
    if mode == "lora":  # 16 bytes per trained parameter of 6.7B: LoRA, whose reference is the adapters off
        assert k.lora_dim > 0 and k.only_optimize_lora and k.reference_mode(work) == "lora" and not k.offload
    elif mode == "copy":  # ZeRO-3 over 8 ranks trains all of it and keeps the copy, full batch
        assert (k.zero_stage, k.lora_dim, k.per_device_train_batch_size) == (3, 0, 8)
        assert k.reference_mode(work) == "copy" and not k.gradient_checkpointing
    else:
        assert not (k.offload or k.offload_reference_model) and k.reference_quantization == "none"


def test_search_prefers_precomputing_to_checkpointing_and_offload(llama7b):
    work = DPOWorkload(llama7b, 512, 8)
    no_lora = {"lora_dim": 0, "only_optimize_lora": False}
    best, _ = search_dpo(work, Hardware(8, 24, 2048), DPOKnobs(per_device_train_batch_size=4), no_lora)
    assert best.knobs.precompute_ref_logps and not best.knobs.offload
    # the same with the copy fixed: it needs checkpointing or offload to fit, which precomputing avoided
    pinned, _ = search_dpo(work, Hardware(8, 24, 2048), DPOKnobs(per_device_train_batch_size=4),
                           no_lora | {"precompute_ref_logps": False})
    assert pinned.knobs.reference_mode(work) == "copy"
    assert pinned.knobs.offload or pinned.knobs.gradient_checkpointing
    assert pinned.cost > best.cost


def test_search_keeps_fixed_flags_and_says_when_nothing_fits(llama7b):
    work = DPOWorkload(llama7b, 512, 1)
    best, _ = search_dpo(work, Hardware(1, 80, 256), DPOKnobs(), {"zero_stage": 2, "lora_dim": 8,
                                                                   "only_optimize_lora": True})
    assert (best.knobs.zero_stage, best.knobs.lora_dim) == (2, 8)
    best, closest = search_dpo(work, Hardware(1, 8, 64), DPOKnobs(), {"offload": False, "lora_dim": 0,
                                                                      "only_optimize_lora": False})
    assert best is None and not closest.knobs.offload and closest.knobs.per_device_train_batch_size == 1
    assert max(closest.prediction.peak_gb().values()) > 8 * 0.9
    refused, _ = search_dpo(work, Hardware(1, 80, 256), DPOKnobs(), {},
                            refuse=lambda k: ["no LoRA here"] if k.lora_dim else [])
    assert refused is None or refused.knobs.lora_dim == 0


# A DPO-shaped config as the DPO main's will be: steps 1/2's parts plus a part with the DPO fields.
@dataclass
class DPOPart:
    offload_reference_model: bool = False
    precompute_ref_logps: bool = False

    def problems(self) -> list[str]:
        return []


@dataclass
class FakeDPOConfig(StepConfig):
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    ds: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    dpo: DPOPart = field(default_factory=DPOPart)


@dataclass
class DPOPartNoPre:  # no --precompute_ref_logps, and a check that refuses an offloaded reference
    offload_reference_model: bool = False

    def problems(self) -> list[str]:
        return ["--offload_reference_model is refused here"] if self.offload_reference_model else []


@dataclass
class FakeConfigNoPre(FakeDPOConfig):
    dpo: DPOPartNoPre = field(default_factory=DPOPartNoPre)


def dpo_config(given: dict, cls: type = FakeDPOConfig) -> FakeDPOConfig:
    cfg = cls()
    for part in dataclasses.fields(cfg):
        names = {f.name for f in dataclasses.fields(getattr(cfg, part.name))}
        mine = {k: v for k, v in given.items() if k in names}
        setattr(cfg, part.name, dataclasses.replace(getattr(cfg, part.name), **mine))
    cfg.given = frozenset(given)
    return cfg


GIVEN = {"max_seq_len": 512, "per_device_train_batch_size": 4, "dtype": "bf16", "lora_dim": 0}


def test_plan_dpo_keeps_given_flags_and_fills_the_rest():
    config = load_config("llama-2-7b")
    cfg = dpo_config(GIVEN | {"zero_stage": 3})
    fitted, message = plan_dpo(cfg, Hardware(8, 24, 2048), config)
    assert fitted.ds.zero_stage == 3 and fitted.lora.lora_dim == 0 and not fitted.lora.only_optimize_lora  # given
    assert fitted.dpo.precompute_ref_logps and not fitted.ds.offload      # chosen, as in the search test above
    assert fitted.given == cfg.given and fitted.train.per_device_train_batch_size <= 4
    assert "--auto_fit chose" in message and "reference: precomputed" in message
    with pytest.raises(UserError, match="nothing fits 1 x 8 GiB.*GiB more per GPU"):
        plan_dpo(cfg, Hardware(1, 8, 64), config)
    # DeepSpeed-Chat's LoRA line with --offload_reference_model asks for an (offloaded) frozen copy, as the DPO
    # config's reference_mode says: the flag is kept and the plan holds the copy, not the adapters-off reference
    habit = dpo_config(GIVEN | {"lora_dim": 8, "only_optimize_lora": True, "offload_reference_model": True})
    kept, message = plan_dpo(habit, Hardware(8, 24, 2048), config)
    assert kept.dpo.offload_reference_model and "reference: copy" in message
    with pytest.raises(UserError, match="no DPO flag combination agrees"):
        plan_dpo(dpo_config(GIVEN | {"offload": True, "zero_stage": 1}), Hardware(8, 24, 2048), config)
    unparsed = dpo_config({"zero_stage": 2})  # dtype None: the machine's, two bytes on a GPU or a CPU
    assert knobs_of(unparsed) == DPOKnobs(zero_stage=2)


def test_plan_dpo_never_sets_a_field_the_config_lacks_and_honours_its_checks():
    config = load_config("llama-2-7b")
    cfg = dpo_config(GIVEN, FakeConfigNoPre)
    fitted, message = plan_dpo(cfg, Hardware(8, 24, 2048), config)
    assert "precompute" not in message and "reference: copy" in message
    assert not fitted.dpo.offload_reference_model and (fitted.ds.offload or fitted.ds.gradient_checkpointing)
    # the same machine with an offloaded reference allowed may choose it; here it is never chosen
    allowed, _ = plan_dpo(dpo_config(GIVEN), Hardware(8, 24, 2048), config)
    assert allowed.dpo.precompute_ref_logps


def test_cli_answer_replans_to_the_same_peaks(capsys, llama7b):
    planner_main(["--step", "dpo", "--model", "llama-2-7b", "--num_gpus", "8", "--gpu_memory_gb", "24",
                  "--max_seq_len", "512", "--per_device_train_batch_size", "4", "--lora_dim", "0", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["fits"] is True and answer["reference"] == "precomputed"
    assert set(answer["peak_gb"]) == {"reference", "train"} and max(answer["peak_gb"].values()) <= 0.9 * 24
    # the flags it prints mean what it planned: given back to the planner, they fit as they are
    args = build_parser().parse_args(shlex.split(answer["flags"]))
    knobs = DPOKnobs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DPOKnobs)
                        if getattr(args, f.name, None) is not None})
    again = predict_dpo(DPOWorkload(llama7b, 512, 8), knobs)
    assert {k: round(v, 2) for k, v in again.peak_gb().items()} == answer["peak_gb"]


def test_cli_text_when_nothing_fits_and_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_:
        planner_main(["--step", "dpo", "--model", "opt-1.3b", "--gpu_memory_gb", "4", "--offload", "false",
                      "--lora_dim", "0"])
    assert exit_.value.code == 1
    text = capsys.readouterr().out
    assert text.startswith("DPO: policy opt-1.3b") and "does not fit: needs" in text and "peak" in text
    with pytest.raises(UserError, match="give --model"):
        planner_main(["--step", "dpo"])
    with pytest.raises(UserError, match="do not go together"):
        planner_main(["--step", "dpo", "--model", "opt-1.3b", "--offload", "--zero_stage", "1"])
    with pytest.raises(UserError, match="--num_gpus must be at least 1"):
        planner_main(["--step", "dpo", "--model", "opt-1.3b", "--num_gpus", "0"])
