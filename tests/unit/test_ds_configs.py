"""The DeepSpeed config builder and the `ds_configs/*.json` templates.

Golden check: filling each template with the builder's config for the matching flags gives the
builder's config exactly, so a change to one without the other fails here. Plus: explicit values
that contradict the flags, "auto" where nothing can fill it, and the builder's own rules.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from engine.errors import UserError
from engine.runtime.ds_config import AUTO, eval_ds_config, fill_template, load_template, train_ds_config

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = ROOT / "ds_configs"

# file name -> (zero stage, offload) it is written for
TEMPLATES = {
    "zero0.json": (0, False),
    "zero1.json": (1, False),
    "zero2.json": (2, False),
    "zero3.json": (3, False),
    "zero2_offload.json": (2, True),
    "zero3_offload.json": (3, True),
}

# Keys whose value depends on flags: "auto" in every template.
FLAG_DEPENDENT = {
    ("train_batch_size",),
    ("train_micro_batch_size_per_gpu",),
    ("gradient_accumulation_steps",),
    ("fp16", "enabled"),
    ("bf16", "enabled"),
    ("gradient_clipping",),
    ("tensorboard", "enabled"),
    ("tensorboard", "output_path"),
    ("tensorboard", "job_name"),
}


def built(stage: int, offload: bool, dtype: str = "bf16", **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(zero_stage=stage, offload=offload, dtype=dtype, micro_batch_size=4,
                                gradient_accumulation_steps=2, world_size=8)
    args.update(kw)
    return train_ds_config(**args)


def leaves(d: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(leaves(value, path + (key,)))
        else:
            out[path + (key,)] = value
    return out


def read(name: str) -> dict[str, Any]:
    return json.loads((DS_CONFIGS / name).read_text())


def test_every_template_is_listed() -> None:
    on_disk = {p.name for p in DS_CONFIGS.glob("*.json")}
    assert on_disk == set(TEMPLATES)
    assert (DS_CONFIGS / "README.md").is_file()


# ----------------------------------------------------------------------------------------------
# Templates vs builder
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_has_the_builders_keys(name: str) -> None:
    stage, offload = TEMPLATES[name]
    template = load_template(str(DS_CONFIGS / name))
    assert set(leaves(template)) == set(leaves(built(stage, offload)))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_autos_are_exactly_the_flag_dependent_keys(name: str) -> None:
    autos = {path for path, value in leaves(read(name)).items() if value == AUTO}
    assert autos == FLAG_DEPENDENT


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_explicit_stage_and_offload(name: str) -> None:
    stage, offload = TEMPLATES[name]
    zero = read(name)["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == ("cpu" if offload else "none")
    assert zero["offload_param"]["device"] == ("cpu" if offload and stage == 3 else "none")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_filled_template_equals_builder(name: str, dtype: str) -> None:
    stage, offload = TEMPLATES[name]
    for kw in ({}, dict(micro_batch_size=1, gradient_accumulation_steps=16, world_size=2,
                        gradient_clipping=0.5, tensorboard_path="out/tb", tensorboard_job="step1")):
        want = built(stage, offload, dtype, **kw)
        assert fill_template(read(name), want, source=name) == want


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_fill_does_not_modify_its_inputs(name: str) -> None:
    stage, offload = TEMPLATES[name]
    template, want = read(name), built(stage, offload)
    template_copy, want_copy = copy.deepcopy(template), copy.deepcopy(want)
    filled = fill_template(template, want)
    assert template == template_copy and want == want_copy
    filled["zero_optimization"]["offload_param"]["device"] = "nvme"
    assert want == want_copy


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_stage_contradicting_the_flags_is_an_error(name: str) -> None:
    stage, offload = TEMPLATES[name]
    other = 3 if stage == 2 else 2  # a stage that keeps the offload setting valid
    with pytest.raises(UserError, match=r"zero_optimization\.stage"):
        fill_template(read(name), built(other, offload), source=name)


@pytest.mark.parametrize("name", ["zero2_offload.json", "zero3_offload.json", "zero3.json"])
def test_template_offload_contradicting_the_flags_is_an_error(name: str) -> None:
    stage, offload = TEMPLATES[name]
    with pytest.raises(UserError, match=r"offload_(param|optimizer)\.device"):
        fill_template(read(name), built(stage, not offload), source=name)


@pytest.mark.parametrize("key,value", [
    (("train_micro_batch_size_per_gpu",), 3),
    (("gradient_accumulation_steps",), 1),
    (("train_batch_size",), 7),
    (("bf16", "enabled"), False),
    (("fp16", "enabled"), True),
])
def test_explicit_batch_or_dtype_contradicting_the_flags_is_an_error(key: tuple[str, ...], value: Any) -> None:
    template = read("zero2.json")
    node = template
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    with pytest.raises(UserError, match=".".join(key).replace(".", r"\.")):
        fill_template(template, built(2, False, "bf16"))


def test_explicit_values_that_agree_are_kept() -> None:
    template = read("zero3.json")
    template["train_micro_batch_size_per_gpu"] = 4
    template["bf16"]["enabled"] = True
    template["zero_optimization"]["stage3_max_live_parameters"] = 123  # a free knob: kept as written
    filled = fill_template(template, built(3, False, "bf16"))
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["zero_optimization"]["stage3_max_live_parameters"] == 123


def test_auto_where_the_builder_has_no_value_is_an_error() -> None:
    template = read("zero2.json")
    template["optimizer"] = {"type": "AdamW", "params": {"lr": AUTO}}
    with pytest.raises(UserError, match=r"optimizer\.params\.lr"):
        fill_template(template, built(2, False), source="mine.json")


def test_unknown_explicit_sections_are_passed_through() -> None:
    template = read("zero2.json")
    template["flops_profiler"] = {"enabled": True, "profile_step": 3}
    filled = fill_template(template, built(2, False))
    assert filled["flops_profiler"] == {"enabled": True, "profile_step": 3}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_load_template_rejects_bad_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match="--deepspeed_config"):
        load_template(str(path))
    with pytest.raises(UserError, match="--deepspeed_config"):
        load_template(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------------------------
# The builder itself
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("micro,accum,world", [(1, 1, 1), (4, 2, 8), (3, 5, 2), (16, 1, 64)])
def test_train_batch_size_is_micro_times_accumulation_times_world(micro: int, accum: int, world: int) -> None:
    cfg = train_ds_config(zero_stage=2, offload=False, dtype="bf16", micro_batch_size=micro,
                          gradient_accumulation_steps=accum, world_size=world)
    assert cfg["train_batch_size"] == micro * accum * world
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_offload_devices(stage: int, offload: bool) -> None:
    zero = built(stage, offload)["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == ("cpu" if offload else "none")
    # parameter offload exists only in ZeRO-3
    assert zero["offload_param"]["device"] == ("cpu" if offload and stage == 3 else "none")


@pytest.mark.parametrize("dtype,fp16,bf16", [("fp16", True, False), ("bf16", False, True),
                                             ("fp32", False, False)])
def test_dtype_sections(dtype: str, fp16: bool, bf16: bool) -> None:
    for cfg in (built(2, False, dtype), eval_ds_config(zero_stage=3, offload=False, dtype=dtype)):
        assert cfg["fp16"]["enabled"] is fp16
        assert cfg["bf16"]["enabled"] is bf16
        assert cfg["fp16"]["loss_scale_window"] == 100


def test_unknown_dtype_is_rejected() -> None:
    with pytest.raises(ValueError):
        built(0, False, "int8")


def test_deepspeed_chat_constants() -> None:
    cfg = built(3, True)
    zero = cfg["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert zero["stage3_param_persistence_threshold"] == 10_000
    assert zero["stage3_max_live_parameters"] == 30_000_000
    assert zero["stage3_prefetch_bucket_size"] == 30_000_000
    assert zero["memory_efficient_linear"] is False
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["prescale_gradients"] is False
    assert cfg["wall_clock_breakdown"] is False


def test_tensorboard_section() -> None:
    assert built(0, False)["tensorboard"] == {"enabled": False, "output_path": "", "job_name": ""}
    on = built(0, False, tensorboard_path="out/tb", tensorboard_job="step1_sft")["tensorboard"]
    assert on == {"enabled": True, "output_path": "out/tb", "job_name": "step1_sft"}


def test_gradient_clipping_is_passed_through() -> None:
    assert built(0, False, gradient_clipping=0.3)["gradient_clipping"] == 0.3


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_eval_config_has_no_optimizer_offload(stage: int, offload: bool) -> None:
    cfg = eval_ds_config(zero_stage=stage, offload=offload, dtype="bf16", micro_batch_size=2, world_size=4)
    zero = cfg["zero_optimization"]
    assert "offload_optimizer" not in zero
    assert "optimizer" not in cfg
    assert zero["stage"] == stage
    assert zero["offload_param"]["device"] == ("cpu" if offload and stage == 3 else "none")
    assert cfg["train_batch_size"] == 2 * 4
    assert cfg["train_micro_batch_size_per_gpu"] == 2
