"""MetricsLogger writes strict JSONL on rank 0, resumes without duplicate steps, and feeds TensorBoard / W&B."""
from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import matplotlib.backends.backend_agg  # noqa: F401  (~1 s import, paid once at collection)
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.errors import UserError
from engine.observe.metrics import MetricsLogger, plot_curves, read_metrics


def _strict_loads(line: str) -> dict:
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(line, parse_constant=reject)


def test_log_writes_one_json_line_per_call(tmp_path):
    with MetricsLogger(tmp_path, is_main=True) as metrics:
        metrics.log(1, {"train/loss": 2.5, "perf/tflops": 0.125})
        metrics.log(2, {"train/loss": torch.tensor(1.5), "train/tokens": 64})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict_loads(line) for line in lines] == [
        {"step": 1, "train/loss": 2.5, "perf/tflops": 0.125},
        {"step": 2, "train/loss": 1.5, "train/tokens": 64},
    ]
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["train/loss"] == 1.5


def test_lines_are_flushed_before_close(tmp_path):
    metrics = MetricsLogger(tmp_path, is_main=True)
    metrics.log(7, {"train/loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 7, "train/loss": 1.0}]
    metrics.close()
    metrics.close()  # idempotent


def test_non_finite_values_become_null(tmp_path):
    with MetricsLogger(tmp_path, is_main=True) as metrics:
        metrics.log(3, {"train/loss": math.nan, "eval/perplexity": math.inf, "eval/neg": -math.inf,
                        "train/lr": 1e-5, "train/t": torch.tensor(float("nan"))})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    assert _strict_loads(line) == {"step": 3, "train/loss": None, "eval/perplexity": None, "eval/neg": None,
                                   "train/lr": 1e-5, "train/t": None}


def test_step_key_is_reserved(tmp_path):
    with MetricsLogger(tmp_path, is_main=True) as metrics, pytest.raises(ValueError, match="reserved"):
        metrics.log(1, {"step": 3})


def test_non_main_rank_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with MetricsLogger(out, is_main=False, tensorboard_dir=tmp_path / "tb") as metrics:
        metrics.log(1, {"train/loss": 1.0})
    assert not out.exists()
    assert not (tmp_path / "tb").exists()


def test_fresh_run_replaces_old_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 99, "train/loss": 5.0}\n')
    with MetricsLogger(tmp_path, is_main=True) as metrics:
        metrics.log(1, {"train/loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 1.0}]


def test_resume_drops_steps_at_or_after_the_first_new_step(tmp_path):
    with MetricsLogger(tmp_path, is_main=True) as metrics:
        for step in range(1, 6):
            metrics.log(step, {"train/loss": float(step)})
    # The checkpoint was at step 2; the run resumes and logs step 3 again. Rows 3, 4, 5 of the
    # interrupted run go, rows 1, 2 stay, and the new step 3 is appended.
    with MetricsLogger(tmp_path, is_main=True, resume=True) as metrics:
        metrics.log(3, {"train/loss": 30.0})
        metrics.log(4, {"train/loss": 40.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(row["step"], row["train/loss"]) for row in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_resume_without_existing_file_starts_one(tmp_path):
    with MetricsLogger(tmp_path, is_main=True, resume=True) as metrics:
        metrics.log(5, {"train/loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 5, "train/loss": 1.0}]


def test_read_metrics_skips_a_truncated_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "tra')
    assert read_metrics(path) == [{"step": 1, "train/loss": 1.0}]
    path.write_text('{"step": 1, "tra\n{"step": 2, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics(path)


def test_tensorboard_gets_finite_scalars(tmp_path):
    tb = tmp_path / "tb"
    with MetricsLogger(tmp_path, is_main=True, tensorboard_dir=tb) as metrics:
        metrics.log(1, {"train/loss": 2.0, "eval/perplexity": math.nan})
        metrics.log(2, {"train/loss": 1.0})
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.0)]
    assert "eval/perplexity" not in events.Tags()["scalars"]


def test_missing_wandb_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLogger(tmp_path, is_main=True, wandb_project="rlhf")
    with pytest.raises(UserError, match="pip install wandb"):  # every rank fails the same way
        MetricsLogger(tmp_path, is_main=False, wandb_project="rlhf")


def test_wandb_receives_finite_metrics_on_rank0(tmp_path, monkeypatch):
    calls = []
    run = SimpleNamespace(log=lambda data, step: calls.append(("log", data, step)),
                          finish=lambda: calls.append(("finish",)))
    fake = SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, is_main=True, wandb_project="rlhf", wandb_config={"lr": 1e-5},
                       run_name="sft") as metrics:
        metrics.log(4, {"train/loss": 0.5, "eval/perplexity": math.inf})
    assert calls == [
        ("init", {"project": "rlhf", "name": "sft", "config": {"lr": 1e-5}, "dir": str(tmp_path)}),
        ("log", {"train/loss": 0.5}, 4),
        ("finish",),
    ]


def test_plot_curves_writes_png(tmp_path):
    with MetricsLogger(tmp_path, is_main=True) as metrics:
        for step in range(1, 4):
            metrics.log(step, {"train/loss": 1.0 / step})
        metrics.log(4, {"eval/perplexity": 3.0})
    png = tmp_path / "plots" / "curves.png"
    out = plot_curves(tmp_path / "metrics.jsonl", png, ["train/loss", "eval/perplexity", "absent/key"], title="t")
    assert out == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == ["curves.png"]  # temp file renamed away


def test_plot_curves_returns_none_without_data(tmp_path):
    with MetricsLogger(tmp_path, is_main=True) as metrics:
        metrics.log(1, {"train/loss": math.nan})
    png = tmp_path / "curves.png"
    assert plot_curves(tmp_path / "metrics.jsonl", png, ["train/loss", "eval/perplexity"]) is None
    assert plot_curves(tmp_path / "missing.jsonl", png, ["train/loss"]) is None
    assert not png.exists()
