"""Step-1 config: one flag per field with DeepSpeed-Chat's names and defaults, YAML < flags, and
validation that raises a UserError naming the flags instead of rewriting anything.

The defaults are those of DeepSpeed-Chat's step-1 `parse_args` (DeepSpeedExamples,
applications/DeepSpeed-Chat/training/step1_supervised_finetuning/main.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import engine.preflight as preflight
from engine.config import Step1Config, arg, parse_data_split
from engine.errors import UserError
from engine.flags import build_config, build_parser, leaf_fields, make_config, parse_config, save_config_yaml


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Every test sees a CPU-only machine unless it says otherwise, so dtype defaults do not
    depend on where the suite runs."""
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Flags: every DeepSpeed-Chat step-1 flag exists, with its default
# ----------------------------------------------------------------------------------------------
# DeepSpeed-Chat step 1 main.py flags (+ --deepspeed/--deepspeed_config from
# deepspeed.add_config_arguments), reference section 2.
DSCHAT_STEP1_FLAGS = [
    "data_path", "data_split", "sft_only_data_path", "data_output_path", "model_name_or_path",
    "per_device_train_batch_size", "per_device_eval_batch_size", "max_seq_len", "learning_rate",
    "weight_decay", "num_train_epochs", "gradient_accumulation_steps", "lr_scheduler_type",
    "num_warmup_steps", "output_dir", "seed", "local_rank", "gradient_checkpointing", "dropout",
    "offload", "dtype", "zero_stage", "lora_dim", "lora_module_name", "only_optimize_lora",
    "lora_learning_rate", "compute_fp32_loss", "enable_tensorboard", "tensorboard_path",
    "add_eot_token", "eot_token", "print_loss", "deepspeed", "deepspeed_config",
]


def _parser_flags() -> set[str]:
    parser = build_parser(Step1Config)
    return {opt for action in parser._actions for opt in action.option_strings}


def test_every_leaf_field_is_a_flag_with_help():
    flags = _parser_flags()
    leaves = leaf_fields(Step1Config)
    assert len(leaves) > len(DSCHAT_STEP1_FLAGS)  # ours adds a few (adam_beta1, resume, ...)
    for name, (_, f, _) in leaves.items():
        assert f"--{name}" in flags, name
        assert f.metadata["help"].strip(), f"--{name} has no help text"
    # Nothing but the leaves, --config and -h/--help.
    assert flags == {f"--{n}" for n in leaves} | {"--config", "-h", "--help"} | {
        f"--no-{n}" for n, (_, _, tp) in leaves.items() if tp is bool}


@pytest.mark.parametrize("name", DSCHAT_STEP1_FLAGS)
def test_dschat_step1_flag_exists(name):
    assert f"--{name}" in _parser_flags()


# Same default as DeepSpeed-Chat unless noted; the notes are our documented departures.
EXPECTED_DEFAULTS = {
    "data_path": [],                 # DS-Chat ['Dahoas/rm-static']; ours [] = the bundled task
    "data_split": "2,4,4",
    "sft_only_data_path": [],
    "data_output_path": None,        # DS-Chat /tmp/data_files/; ours None = <output_dir>/data_cache
    "model_name_or_path": None,      # DS-Chat required; ours None = the built-in tiny model
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "max_seq_len": 512,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "num_train_epochs": 1,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "num_warmup_steps": 0,
    "output_dir": "output/step1_sft",  # DS-Chat None
    "seed": 1234,
    "local_rank": -1,
    "gradient_checkpointing": False,
    "dropout": None,
    "offload": False,
    "dtype": "bf16",                 # DS-Chat fp16; bf16 on a machine without CUDA (this fixture)
    "zero_stage": 0,
    "lora_dim": 0,
    "lora_module_name": "auto",      # DS-Chat "decoder.layers." (OPT only)
    "only_optimize_lora": False,
    "lora_learning_rate": 5e-4,
    "compute_fp32_loss": False,
    "enable_tensorboard": False,
    "tensorboard_path": "step1_tensorboard",
    "add_eot_token": False,
    "eot_token": "<|endoftext|>",
    "print_loss": False,
    "deepspeed": False,
    "deepspeed_config": None,
}


def _flat(cfg) -> dict:
    return {k: v for part in dataclasses.asdict(cfg).values() for k, v in part.items()}


def test_defaults_match_dschat_step1():
    assert set(EXPECTED_DEFAULTS) == set(DSCHAT_STEP1_FLAGS)
    flat = _flat(parse_config(Step1Config, []))
    assert {k: flat[k] for k in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS


def test_dtype_default_is_fp16_with_cuda(monkeypatch):
    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    assert parse_config(Step1Config, []).ds.dtype == "fp16"


def test_lr_scheduler_choices_are_dschat_ones():
    parser = build_parser(Step1Config)
    action = next(a for a in parser._actions if "--lr_scheduler_type" in a.option_strings)
    assert set(action.choices) == {"linear", "cosine", "cosine_with_restarts", "polynomial",
                                   "constant", "constant_with_warmup"}


def test_flags_land_in_their_parts():
    cfg = parse_config(Step1Config, [
        "--data_path", "a.jsonl", "b.jsonl", "--zero_stage", "2", "--offload", "--lora_dim", "8",
        "--learning_rate", "2e-5", "--dropout", "0.0", "--gradient_checkpointing"])
    assert cfg.data.data_path == ["a.jsonl", "b.jsonl"]
    assert (cfg.ds.zero_stage, cfg.ds.offload, cfg.ds.gradient_checkpointing) == (2, True, True)
    assert cfg.lora.lora_dim == 8
    assert cfg.train.learning_rate == 2e-5
    assert cfg.model.dropout == 0.0


@dataclass
class _PartA:
    seed: int = arg(1, "x")


@dataclass
class _PartB:
    seed: int = arg(2, "y")


@dataclass
class _Twice:  # module level: get_type_hints must resolve the part names
    a: _PartA = field(default_factory=_PartA)
    b: _PartB = field(default_factory=_PartB)


def test_a_field_declared_in_two_parts_is_refused():
    with pytest.raises(TypeError, match="--seed is declared twice"):
        leaf_fields(_Twice)


# ----------------------------------------------------------------------------------------------
# YAML: defaults < --config file < flags
# ----------------------------------------------------------------------------------------------
def test_precedence_default_then_yaml_then_flag(tmp_path):
    path = write_yaml(tmp_path, "seed: 7\nmax_seq_len: 256\n")
    cfg = parse_config(Step1Config, ["--config", path, "--seed", "9"])
    assert cfg.train.seed == 9                  # flag beats YAML
    assert cfg.data.max_seq_len == 256          # YAML beats default 512
    assert cfg.train.num_train_epochs == 1      # default where neither says
    # the flag may come before --config: still wins
    assert parse_config(Step1Config, ["--seed", "9", "--config", path]).train.seed == 9


def test_given_records_the_flags_from_yaml_and_command_line(tmp_path):
    path = write_yaml(tmp_path, "ds:\n  zero_stage: 0\nseed: 1234\n")  # both equal to their defaults
    cfg = parse_config(Step1Config, ["--config", path, "--lora_dim", "0", "--no-offload"])
    assert cfg.given == {"zero_stage", "seed", "lora_dim", "offload"}
    assert cfg == parse_config(Step1Config, [])  # the same values as no flags at all, yet given
    assert parse_config(Step1Config, []).given == frozenset()
    assert make_config(Step1Config, {"seed": 7}).given == {"seed"}


def test_yaml_keys_nested_by_part(tmp_path):
    path = write_yaml(tmp_path, "ds:\n  zero_stage: 3\n  offload: true\n"
                                "lora:\n  lora_dim: 4\ntrain:\n  seed: 11\nmax_seq_len: 64\n")
    cfg = parse_config(Step1Config, ["--config", path])
    assert (cfg.ds.zero_stage, cfg.ds.offload) == (3, True)
    assert cfg.lora.lora_dim == 4
    assert cfg.train.seed == 11
    assert cfg.data.max_seq_len == 64


def test_yaml_exponent_string_is_coerced_to_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 without a dot as the *string* "1e-3".
    path = write_yaml(tmp_path, "learning_rate: 1e-3\nlora_learning_rate: 2e-4\n")
    cfg = parse_config(Step1Config, ["--config", path])
    assert cfg.train.learning_rate == 0.001 and isinstance(cfg.train.learning_rate, float)
    assert cfg.lora.lora_learning_rate == 0.0002


def test_yaml_scalar_becomes_one_element_list(tmp_path):
    path = write_yaml(tmp_path, "data_path: my.jsonl\n")
    assert parse_config(Step1Config, ["--config", path]).data.data_path == ["my.jsonl"]


@pytest.mark.parametrize("text, key", [
    ("zero_stag: 2\n", "zero_stag"),                  # typo at the top level
    ("ds:\n  zero_stag: 2\n", "zero_stag"),           # typo inside a part block
    ("config: other.yaml\n", "config"),               # --config is not a field
])
def test_unknown_yaml_key_is_a_user_error(tmp_path, text, key):
    path = write_yaml(tmp_path, text)
    with pytest.raises(UserError, match=key):
        parse_config(Step1Config, ["--config", path])


@pytest.mark.parametrize("text, key", [
    ("zero_stage: 2.5\n", "zero_stage"),     # not an int
    ("offload: 'true'\n", "offload"),         # a string, not a YAML bool
    ("seed: null\n", "seed"),                 # null where the field is not optional
    ("learning_rate: fast\n", "learning_rate"),
])
def test_yaml_value_of_the_wrong_type_is_a_user_error(tmp_path, text, key):
    path = write_yaml(tmp_path, text)
    with pytest.raises(UserError, match=key):
        parse_config(Step1Config, ["--config", path])


def test_yaml_bad_choice_is_a_user_error(tmp_path):
    path = write_yaml(tmp_path, "dtype: fp8\n")
    with pytest.raises(UserError, match=r"--dtype 'fp8'.*fp16, bf16, fp32"):
        parse_config(Step1Config, ["--config", path])


def test_missing_or_non_mapping_yaml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_config(Step1Config, ["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(UserError, match="mapping"):
        parse_config(Step1Config, ["--config", write_yaml(tmp_path, "- 1\n- 2\n")])


def test_no_flag_overrides_true_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "offload: true\nzero_stage: 2\n")
    assert parse_config(Step1Config, ["--config", path]).ds.offload is True
    assert parse_config(Step1Config, ["--config", path, "--no-offload"]).ds.offload is False


def test_saved_yaml_round_trips(tmp_path):
    cfg = parse_config(Step1Config, [
        "--data_path", "a.jsonl", "b", "--sft_only_data_path", "c.jsonl", "--data_split", "6,2,2",
        "--learning_rate", "2e-5", "--zero_stage", "3", "--offload", "--lora_dim", "8",
        "--only_optimize_lora", "--dropout", "0.1", "--dtype", "fp32", "--seed", "42",
        "--output_dir", str(tmp_path / "out"), "--lr_scheduler_type", "linear"])
    path = tmp_path / "resolved.yaml"
    save_config_yaml(cfg, path)
    again = parse_config(Step1Config, ["--config", str(path)])
    assert again == cfg
    assert again.train.learning_rate == 2e-5 and again.data.data_path == ["a.jsonl", "b"]


def test_config_yaml_names_the_bundled_data_when_no_data_path_is_given(tmp_path):
    from engine.data.sources import BUNDLED, default_data_note

    assert default_data_note(["Dahoas/rm-static"]) is None
    note = default_data_note([])
    assert BUNDLED in note and "--data_path Dahoas/rm-static" in note
    cfg = parse_config(Step1Config, ["--seed", "7"])
    path = tmp_path / "resolved.yaml"
    save_config_yaml(cfg, path, [note])
    assert path.read_text().startswith(f"# {note}\n")
    assert parse_config(Step1Config, ["--config", str(path)]) == cfg  # the note is a comment


# ----------------------------------------------------------------------------------------------
# Command-line mistakes
# ----------------------------------------------------------------------------------------------
def test_unknown_flag_is_a_user_error():
    with pytest.raises(UserError, match="--zero_stag"):
        parse_config(Step1Config, ["--zero_stag", "2"])


@pytest.mark.parametrize("argv", [["--learning", "0.1"], ["--lora_d", "4"], ["--zero", "2"]])
def test_abbreviated_flag_is_rejected(argv):
    # argparse would expand a unique prefix; allow_abbrev=False makes it an unknown flag instead.
    with pytest.raises(UserError, match=argv[0]):
        parse_config(Step1Config, argv)


def test_stray_value_after_a_boolean_flag_is_a_user_error():
    # `--offload 1`: BooleanOptionalAction takes no value, so "1" is left over.
    with pytest.raises(UserError, match="unknown flag"):
        parse_config(Step1Config, ["--offload", "1", "--zero_stage", "2"])


@pytest.mark.parametrize("argv", [["--zero_stage", "5"], ["--dtype", "fp8"]])
def test_cli_bad_choice_is_a_user_error(argv):
    with pytest.raises(UserError, match=argv[0]):
        parse_config(Step1Config, argv)


# ----------------------------------------------------------------------------------------------
# Contradictions: UserError naming the flags
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["0", "1"])
def test_offload_below_zero2_is_refused(stage):
    with pytest.raises(UserError) as exc:
        parse_config(Step1Config, ["--offload", "--zero_stage", stage])
    assert "--offload" in str(exc.value) and "--zero_stage" in str(exc.value)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_offload_with_zero2_or_3_is_accepted(stage):
    assert parse_config(Step1Config, ["--offload", "--zero_stage", stage]).ds.offload is True


def test_fp16_without_cuda_is_refused():
    with pytest.raises(UserError, match="--dtype fp16"):
        parse_config(Step1Config, ["--dtype", "fp16"])


def test_fp16_with_cuda_is_accepted(monkeypatch):
    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    assert parse_config(Step1Config, ["--dtype", "fp16"]).ds.dtype == "fp16"


def test_negative_lora_dim_is_refused():
    with pytest.raises(UserError, match="--lora_dim"):
        parse_config(Step1Config, ["--lora_dim", "-1"])


def test_only_optimize_lora_without_lora_is_refused():
    with pytest.raises(UserError) as exc:
        parse_config(Step1Config, ["--only_optimize_lora"])
    assert "--only_optimize_lora" in str(exc.value) and "--lora_dim" in str(exc.value)
    assert parse_config(Step1Config, ["--only_optimize_lora", "--lora_dim", "4"]).lora.only_optimize_lora


@pytest.mark.parametrize("split", ["1,2", "a,b,c", "0,0,0", "-1,1,1", "1,2,3,4"])
def test_bad_data_split_is_refused(split):
    with pytest.raises(UserError, match="--data_split"):
        parse_config(Step1Config, [f"--data_split={split}"])  # "=": "-1,1,1" is not a flag


@pytest.mark.parametrize("dropout", ["1.5", "1.0", "-0.1"])
def test_dropout_outside_0_1_is_refused(dropout):
    with pytest.raises(UserError, match="--dropout"):
        parse_config(Step1Config, ["--dropout", dropout])


def test_all_problems_are_listed_in_one_error():
    # --offload/--zero_stage 0 and --lora_dim -1 live in different parts; both are reported.
    with pytest.raises(UserError) as exc:
        parse_config(Step1Config, ["--offload", "--lora_dim", "-1"])
    assert "--offload" in str(exc.value) and "--lora_dim" in str(exc.value)


def test_bad_data_split_does_not_hide_other_problems():
    with pytest.raises(UserError) as exc:
        parse_config(Step1Config, ["--dropout", "1.5", "--data_split", "1,2"])
    assert "--dropout" in str(exc.value) and "--data_split" in str(exc.value)


def test_machine_checks_are_apart_from_the_pure_ones(tmp_path):
    # fp16 on this CPU-only machine (the fixture) and a missing file: the config itself is fine.
    cfg = build_config(Step1Config, {"dtype": "fp16", "deepspeed_config": str(tmp_path / "absent.json")})
    assert cfg.problems() == []
    found = preflight.preflight(cfg)
    assert len(found) == 2 and "--dtype fp16" in found[0] and "--deepspeed_config" in found[1]
    with pytest.raises(UserError) as exc:  # the parser lists both kinds together
        parse_config(Step1Config, ["--dtype", "fp16", "--deepspeed_config", str(tmp_path / "absent.json"),
                                   "--lora_dim", "-1"])
    assert all(flag in str(exc.value) for flag in ("--dtype fp16", "--deepspeed_config", "--lora_dim"))


def test_make_config_validates_and_refuses_unknown_keys():
    with pytest.raises(UserError, match="zero_stag"):
        make_config(Step1Config, {"zero_stag": 2})
    with pytest.raises(UserError, match="--offload"):
        make_config(Step1Config, {"offload": True})


# ----------------------------------------------------------------------------------------------
# parse_data_split
# ----------------------------------------------------------------------------------------------
def test_parse_data_split_normalises():
    # 2 + 4 + 4 = 10 -> 2/10, 4/10, 4/10
    assert parse_data_split("2,4,4") == [0.2, 0.4, 0.4]
    # 1 + 0 + 1 = 2 -> 0.5, 0, 0.5 (a zero weight is allowed: that step gets no rows)
    assert parse_data_split("1,0,1") == [0.5, 0.0, 0.5]
    assert parse_data_split("10,0,0") == [1.0, 0.0, 0.0]
