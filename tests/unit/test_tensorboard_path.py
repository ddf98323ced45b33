"""Where TensorBoard events go: the default inside --output_dir, a given --tensorboard_path as DeepSpeed-Chat
resolves it (dschat/utils/ds_utils.py: relative to the working directory, `<path>/ds_tensorboard_logs/
<job>_tensorboard`), so DeepSpeed-Chat's `--tensorboard_path $OUTPUT` no longer lands in $OUTPUT/$OUTPUT."""
from __future__ import annotations

from pathlib import Path

import pytest

import engine.preflight as preflight
from engine.config import Step1Config, Step2Config, Step3Config
from engine.flags import parse_config
from engine.runtime.run import tensorboard_dir


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)


def test_off_without_the_switch(tmp_path):
    assert tensorboard_dir(parse_config(Step1Config, ["--tensorboard_path", "tb"]), tmp_path) is None


@pytest.mark.parametrize("cls, default", [(Step1Config, "step1_tensorboard"), (Step2Config, "step2_tensorboard"),
                                          (Step3Config, "step3_tensorboard")])
def test_default_stays_inside_the_output_dir(cls, default, tmp_path):
    assert tensorboard_dir(parse_config(cls, ["--enable_tensorboard"]), tmp_path / "out") == tmp_path / "out" / default


@pytest.mark.parametrize("cls, job", [(Step1Config, "step1_model"), (Step2Config, "step2_model"),
                                      (Step3Config, "step3_model")])
def test_a_given_relative_path_is_relative_to_the_working_directory(cls, job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("output")  # the shipped scripts: --output_dir ./output --tensorboard_path ./output
    cfg = parse_config(cls, ["--enable_tensorboard", "--tensorboard_path", "./output", "--output_dir", str(out)])
    assert tensorboard_dir(cfg, out) == tmp_path / "output" / "ds_tensorboard_logs" / f"{job}_tensorboard"
