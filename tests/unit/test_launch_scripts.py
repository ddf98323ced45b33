"""Static checks of the launch scripts under `step*/training_scripts/`.

Every script must be valid, executable bash with `set -euo pipefail`, and pass `main.py` only flags
its step's config knows (`engine.flags.leaf_fields(Step<N>Config)`), with the right number of
values and, where a flag has `choices` and the value is a literal, an allowed value. A script of a
step whose config class does not exist yet is skipped, with the reason.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

import engine.config as engine_config
from engine.flags import leaf_fields
from tests.helpers.launch_scripts import code_lines, launched_flag_sets, main_py_args, parse_flags

ROOT = Path(__file__).resolve().parents[2]
ALL_SCRIPTS = sorted(ROOT.glob("step*/training_scripts/**/*.sh"))
ALL_IDS = [str(p.relative_to(ROOT)) for p in ALL_SCRIPTS]


def runs_main_py(script: Path) -> bool:
    return bool(re.search(r"main\.py\b", code_lines(script.read_text())))


# Scripts that run a step's main.py; the others (the sweeps' drivers) run those scripts.
SCRIPTS = [p for p in ALL_SCRIPTS if runs_main_py(p)]
SCRIPT_IDS = [str(p.relative_to(ROOT)) for p in SCRIPTS]
DRIVERS = [p for p in ALL_SCRIPTS if not runs_main_py(p)]
DRIVER_IDS = [str(p.relative_to(ROOT)) for p in DRIVERS]
STEP_DIR = re.compile(r"^step(\d+)_")


def script_step(script: Path) -> int:
    top = script.relative_to(ROOT).parts[0]
    match = STEP_DIR.match(top)
    assert match, f"{top}: launch-script folders are named step<N>_<name>"
    return int(match.group(1))


# Step folders whose config is not Step<N>Config.
FOLDER_CONFIGS = {"step2_dpo": "DPOConfig"}


def config_class(script: Path) -> type:
    top = script.relative_to(ROOT).parts[0] if script.is_relative_to(ROOT) else ""
    name = FOLDER_CONFIGS.get(top, f"Step{script_step(script)}Config")
    cls = getattr(engine_config, name, None)
    if cls is None:
        pytest.skip(f"engine.config has no {name} yet, so the flags of {script.name} cannot be checked")
    return cls


def _base(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) is not list:
        return args[0]
    return tp


def is_literal(value: str) -> bool:
    return "$" not in value and "`" not in value


def check_flags(script: Path, cls: type) -> None:
    leaves = leaf_fields(cls)
    args = main_py_args(script)
    assert args, f"{script}: no flags after main.py"
    problems: list[str] = []
    for name, values in parse_flags(args):
        negated = name.startswith("no-") and name[3:] in leaves
        key = name[3:] if negated else name
        if key not in leaves:
            problems.append(f"--{name} is not a flag of {cls.__name__}")
            continue
        _, field, tp = leaves[key]
        base = _base(tp)
        if base is bool:
            if values:
                problems.append(f"--{name} is a switch and takes no value (got {values})")
            continue
        if negated:
            problems.append(f"--{name}: only switches have a --no- form")
            continue
        if typing.get_origin(base) is list:
            if not values:
                problems.append(f"--{name} given without values")
            item_type = typing.get_args(base)[0]
        elif len(values) != 1:
            problems.append(f"--{name} takes one value (got {values})")
            continue
        else:
            item_type = base
        choices = field.metadata.get("choices")
        for value in values:
            if not is_literal(value):
                continue
            try:
                converted = item_type(value)
            except (TypeError, ValueError):
                problems.append(f"--{name} {value!r} is not a valid {item_type.__name__}")
                continue
            if choices and converted not in choices:
                problems.append(f"--{name} {value!r}: choose one of {', '.join(map(str, choices))}")
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    assert not problems, f"{shown}:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------------
# The parser of this test, on known text
# ----------------------------------------------------------------------------------------------
SAMPLE = """#!/usr/bin/env bash
# runs main.py (this comment mentions main.py and --bogus_flag, and is ignored)
set -euo pipefail
deepspeed --num_gpus 2 --master_port 12346 "$ROOT/step1_sft/main.py" \\
   --data_path a b \\
   --zero_stage "$ZERO_STAGE" \\
   --dtype=bf16 \\
   --no-offload \\
   --output_dir "$OUTPUT" \\
   2>&1 | tee "$OUTPUT/training.log"
"""


def test_parser_reads_only_main_py_flags(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text(SAMPLE)
    assert parse_flags(main_py_args(script)) == [
        ("data_path", ["a", "b"]), ("zero_stage", ["$ZERO_STAGE"]), ("dtype", ["bf16"]),
        ("no-offload", []), ("output_dir", ["$OUTPUT"])]
    check_flags(script, engine_config.Step1Config)


@pytest.mark.parametrize("line,message", [
    ("--zero_stage 4", "choose one of"),
    ("--dtype fp8", "choose one of"),
    ("--not_a_flag 1", "not a flag"),
    ("--offload yes", "takes no value"),
    ("--max_seq_len", "takes one value"),
    ("--max_seq_len many", "not a valid int"),
])
def test_checker_catches_bad_flags(tmp_path: Path, line: str, message: str) -> None:
    script = tmp_path / "s.sh"
    script.write_text(f'deepspeed main.py \\\n  {line} \\\n  --output_dir x 2>&1 | tee log\n')
    with pytest.raises(AssertionError, match=message):
        check_flags(script, engine_config.Step1Config)


# ----------------------------------------------------------------------------------------------
# The scripts
# ----------------------------------------------------------------------------------------------
def test_step1_scripts_exist() -> None:
    names = {str(p.relative_to(ROOT / "step1_sft" / "training_scripts")) for p in SCRIPTS
             if p.is_relative_to(ROOT / "step1_sft")}
    assert {"opt/single_gpu/run_1.3b.sh", "opt/single_node/run_1.3b.sh", "opt/multi_node/run_66b.sh",
            "llama2/run_llama2_7b.sh", "llama2/run_llama2_7b_lora.sh", "tiny/run_cpu.sh"} <= names


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=ALL_IDS)
def test_bash_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=ALL_IDS)
def test_executable(script: Path) -> None:
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=ALL_IDS)
def test_header(script: Path) -> None:
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert lines[1].startswith("#"), "a comment saying what the script trains, on what hardware"
    assert re.search(r"^set -euo pipefail$", script.read_text(), re.M)


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_flags_are_known(script: Path) -> None:
    check_flags(script, config_class(script))


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_logs_to_output(script: Path) -> None:
    args = main_py_args(script)
    assert "--deepspeed" in args
    text = code_lines(script.read_text())
    assert re.search(r'\|\s*tee\s+"\$OUTPUT/training\.log"', text), "output goes to $OUTPUT/training.log"


# Sweep points take DeepSpeed-Chat's positional order (stage, switches, then the output folder); they are checked
# by test_sweep_points_take_dschat_positional_order.
STEP1_FRONT = [p for p in SCRIPTS if p.is_relative_to(ROOT / "step1_sft") and p.parent.name != "sweep"]


@pytest.mark.parametrize("script", STEP1_FRONT, ids=[str(p.relative_to(ROOT)) for p in STEP1_FRONT])
def test_step1_positional_args(script: Path) -> None:
    text = script.read_text()
    assert re.search(r"^OUTPUT=\$\{1:-[^}]+\}$", text, re.M)
    assert re.search(r"^ZERO_STAGE=\$\{2:-[0-3]\}$", text, re.M)
    assert 'mkdir -p "$OUTPUT"' in text
    args = parse_flags(main_py_args(script))
    assert ("zero_stage", ["$ZERO_STAGE"]) in args
    assert ("output_dir", ["$OUTPUT"]) in args


# DeepSpeed-Chat's sweep points: their positional arguments in order, with the defaults it gives them.
DSCHAT_SWEEP_POSITIONALS = {
    "step1_sft": ["ZERO_STAGE=${1:-2}", "OFFLOAD=${2:-false}", "LORA=${3:-false}", "OUTPUT=${4:-./output}"],
    "step2_reward": ["ZERO_STAGE=${1:-0}", "OFFLOAD=${2:-false}", "OUTPUT=${3:-./output}"],
    "step2_dpo": ["ZERO_STAGE=${1:-0}", "OFFLOAD=${2:-false}", "OUTPUT=${3:-./output}"],
    "step3_rlhf": ["ACTOR_MODEL_PATH=${1:?$USAGE}", "CRITIC_MODEL_PATH=${2:?$USAGE}", "ACTOR_ZERO_STAGE=${3:-2}",
                   "CRITIC_ZERO_STAGE=${4:-2}", "HYBRID_ENGINE=${5:-false}", "OFFLOAD=${6:-false}",
                   "LORA=${7:-false}", "MIXED_PRECISION_LORA=${8:-false}", "OUTPUT=${9:-./output}",
                   "TEST=${10:-false}", "TEST_STOP_STEP=${11:-5}"],
}


@pytest.mark.parametrize("step", sorted(DSCHAT_SWEEP_POSITIONALS))
def test_sweep_points_take_dschat_positional_order(step: str) -> None:
    """A DeepSpeed-Chat user calls a sweep point by hand with its arguments in DeepSpeed-Chat's order."""
    text = (ROOT / step / "training_scripts/opt/single_node/sweep/run_single.sh").read_text()
    assigned = re.findall(r"^([A-Z_]+=\$\{\d+[:?-][^}]*\})$", text, re.M)
    assert assigned == DSCHAT_SWEEP_POSITIONALS[step]


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_a_named_model_comes_with_named_data(script: Path) -> None:
    """Without --data_path the engine trains on the bundled toy task: fine for the built-in tiny
    model, never what a script fine-tuning a real hub model means (DeepSpeed-Chat's default data is
    Dahoas/rm-static, ours is not)."""
    flags = dict(parse_flags(main_py_args(script)))
    named = [v for name, v in flags.items() if name.endswith("model_name_or_path")]
    # A model given by the caller (a shell variable, e.g. a step-1 output trained on the same bundled
    # task) is fine; a hard-coded hub model is the mistake this test is for.
    if any(is_literal(v[0]) for v in named if v):
        assert "data_path" in flags or "sft_only_data_path" in flags, \
            f"{script.relative_to(ROOT)} names a model but no --data_path"


def test_tiny_cpu_script_uses_builtin_model_and_data() -> None:
    script = ROOT / "step1_sft" / "training_scripts" / "tiny" / "run_cpu.sh"
    flags = dict(parse_flags(main_py_args(script)))
    assert "model_name_or_path" not in flags and "data_path" not in flags
    assert flags["dtype"] == ["bf16"] and flags["lora_dim"] == ["8"]
    assert {"offload", "gradient_checkpointing"} <= set(flags)
    assert re.search(r"^ZERO_STAGE=\$\{2:-3\}$", script.read_text(), re.M)
    assert re.search(r"deepspeed --num_gpus 2 ", code_lines(script.read_text()))


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_script_passes_extra_flags_after_its_positional_arguments(script: Path) -> None:
    """e2e_rlhf.py's --stepN-args rely on it: every script hands "${@:N+1}" to main.py, N its positionals."""
    text = code_lines(script.read_text())
    last = max(int(k) for k in re.findall(r"\$\{(\d+)[:?-]", text))
    assert f'"${{@:{last + 1}}}"' in text, f"{script.name} takes {last} positional arguments"


# ----------------------------------------------------------------------------------------------
# DeepSpeed-Chat's script shapes, and every flag set through the step's parser
# ----------------------------------------------------------------------------------------------
DSCHAT_SHAPES = {
    "step1_sft": {"opt/single_gpu/run_1.3b.sh", "opt/single_gpu/run_6.7b_lora.sh", "opt/single_node/run_1.3b.sh",
                  "opt/single_node/run_1.3b_lora.sh", "opt/single_node/run_6.7b.sh", "opt/single_node/run_13b.sh",
                  "opt/single_node/run_30b_lora.sh", "opt/multi_node/run_66b.sh", "llama2/run_llama2_7b.sh",
                  "llama2/run_llama2_7b_lora.sh", "opt/single_node/sweep/run_single.sh",
                  "opt/single_node/sweep/run_step1_sweep.sh", "other_language/run_chinese.sh",
                  "other_language/run_japanese.sh"},
    "step2_reward": {"opt/single_gpu/run_350m.sh", "opt/single_node/run_350m.sh", "opt/multi_node/run_350m.sh",
                     "llama2/run_llama2_7b.sh", "llama2/run_llama2_7b_lora.sh", "opt/single_node/sweep/run_single.sh",
                     "opt/single_node/sweep/run_step2_sweep.sh"},
    "step2_dpo": {"opt/single_gpu/run_350m.sh", "opt/single_node/run_350m.sh", "opt/multi_node/run_350m.sh",
                  "llama2/run_llama2_7b.sh", "llama2/run_llama2_7b_lora.sh", "opt/single_node/sweep/run_single.sh",
                  "opt/single_node/sweep/run_step2_sweep.sh"},
    "step3_rlhf": {"opt/single_gpu/run_1.3b.sh", "opt/single_gpu/run_6.7b_lora.sh", "opt/single_node/run_1.3b.sh",
                   "opt/single_node/run_1.3b_lora.sh", "opt/single_node/run_6.7b.sh", "opt/single_node/run_13b.sh",
                   "opt/single_node/run_30b_lora.sh", "opt/multi_node/run_66b.sh", "llama2/run_llama2_7b.sh",
                   "llama2/run_llama2_7b_lora.sh", "llama2/run_llama2_7b_mixz.sh",
                   "opt/single_node/sweep/run_single.sh", "opt/single_node/sweep/run_step3_sweep.sh"},
}


@pytest.mark.parametrize("step", sorted(DSCHAT_SHAPES))
def test_every_dschat_script_shape_is_shipped(step):
    folder = ROOT / step / "training_scripts"
    have = {str(p.relative_to(folder)) for p in ALL_SCRIPTS if p.is_relative_to(folder)}
    assert DSCHAT_SHAPES[step] <= have, sorted(DSCHAT_SHAPES[step] - have)
    for sweep in folder.glob("**/sweep"):
        assert (sweep / "README.md").is_file(), f"{sweep.relative_to(ROOT)} has no README.md"


@pytest.mark.parametrize("script", DRIVERS, ids=DRIVER_IDS)
def test_driver_runs_scripts_that_exist(script):
    called = re.findall(r'"\$HERE/([\w.]+\.sh)"', code_lines(script.read_text()))
    assert called, f"{script.name} calls no script"
    assert all((script.parent / name).is_file() for name in called)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=ALL_IDS)
def test_every_flag_set_parses(script, tmp_path, monkeypatch):
    """Each main.py command a script (or a sweep driver) launches parses into its step's config with every
    check passing, on a machine with CUDA (the scripts' target); no training runs."""
    import engine.preflight as preflight
    from engine.flags import parse_config

    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    monkeypatch.setattr(preflight, "missing_quantization_packages", lambda: [])
    sets = launched_flag_sets(script, tmp_path)
    assert sets, f"{script.name} launched nothing"
    for words in sets:
        cls = config_class(Path(words[0]))
        parse_config(cls, words[1:])  # raises UserError, naming the problems, if a set is refused


def test_flag_sets_of_a_sweep_and_a_refused_set_are_seen(tmp_path, monkeypatch):
    """The stand-in launcher sees every point of a sweep, and a set the config refuses fails the parse."""
    from engine.errors import UserError
    from engine.flags import parse_config

    sweep = ROOT / "step3_rlhf/training_scripts/opt/single_node/sweep/run_step3_sweep.sh"
    sets = launched_flag_sets(sweep, tmp_path / "sweep")
    mixz = [s for s in sets if "--enable_mixed_precision_lora" in s]
    assert len(sets) == 18 and len(mixz) == 2  # DeepSpeed-Chat's grid: MixZ++ with and without the hybrid engine
    assert sorted("--enable_hybrid_engine" in s for s in mixz) == [False, True]
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\ndeepspeed "$0/step3_rlhf/main.py" --inference_tp_size 0\n')
    words, = launched_flag_sets(bad, tmp_path / "bad")
    with pytest.raises(UserError, match="--inference_tp_size must be >= 1"):
        parse_config(config_class(Path(words[0].replace(str(bad), str(ROOT)))), words[1:])
