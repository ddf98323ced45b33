"""benchmarks/trl_grpo_compare.py without TRL: the clean error when it is missing or outside the tested range,
the extra in setup.py, the report on made-up results, our run's matched flags; with TRL (skipped when it is
absent), its GRPOConfig matches ours."""
from __future__ import annotations

import ast
import importlib.util
import sys
import types

import pytest
from packaging.requirements import Requirement

from engine.errors import UserError
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "trl_grpo_compare.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("trl_grpo_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_trl_is_one_line_error_with_the_install_command(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exc:
        bench.run_main(bench.main, ["--work_dir", str(work), "--steps", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TRL is not installed") and len(err.splitlines()) == 1
    assert 'pip install -e ".[trl]"' in err and bench.TRL_REQUIREMENT in err
    assert not work.exists()  # checked before anything is built or written


@pytest.mark.parametrize("version, ok", [("1.16.0", True), ("1.16.3", True), ("1.15.0", False), ("1.17.0", False)])
def test_trl_outside_the_tested_range_is_refused(bench, monkeypatch, version, ok):
    monkeypatch.setitem(sys.modules, "trl", types.SimpleNamespace(__version__=version))
    if ok:
        assert bench.require_trl() == version
    else:
        with pytest.raises(UserError, match=f"TRL {version} is installed.*tested with trl>=1.16.0,<1.17"):
            bench.require_trl()


def test_a_bad_sft_model_is_refused_before_anything_is_written(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", types.SimpleNamespace(__version__="1.16.0"))
    work = tmp_path / "work"
    with pytest.raises(UserError, match="not a model folder"):
        bench.main(["--work_dir", str(work), "--sft_model", str(tmp_path / "missing")])
    assert not work.exists()


def test_setup_py_trl_extra_is_the_script_requirement(bench):
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    assert [str(Requirement(r)) for r in extras["trl"]] == [str(Requirement(bench.TRL_REQUIREMENT))]


@pytest.mark.parametrize("flags, message", [(["--group_size", "1"], "at least 2"),
                                            (["--eval_prompts", "32"], "64 or more"),
                                            (["--steps", "0"], "must be >= 1")])
def test_bad_settings_are_refused(bench, flags, message):
    with pytest.raises(UserError, match=message):
        bench.parse_args(flags)


def fake_run(trainer, seed, successes, step_s, startup_s=10.0):
    curve = [{"step": 10 * i, "completions": 640 * i, "rule_success": s} for i, s in enumerate(successes)]
    return {"trainer": trainer, "seed": seed, "curve": curve, "step_s": step_s, "startup_s": startup_s,
            "eval_s": 1.0, "wall_s": startup_s + sum(step_s) + 1.0, "versions": {}}


def test_report_means_medians_and_verdict_on_made_up_runs(bench):
    runs = [fake_run("trl", 1, [0.25, 0.30, 0.40], [1.0, 3.0, 2.0]),
            fake_run("ours", 1, [0.25, 0.35, 0.45], [0.5, 0.7, 0.6], startup_s=4.5),
            fake_run("ours", 2, [0.25, 0.25, 0.40], [0.4, 0.8, 0.9], startup_s=5.5),
            fake_run("trl", 2, [0.25, 0.30, 0.30], [2.0, 2.5, 1.5])]
    report = bench.build_report(runs, {"steps": 20})
    assert [(r["trainer"], r["seed"]) for r in report["runs"]] == [("ours", 1), ("ours", 2), ("trl", 1), ("trl", 2)]
    ours, trl = report["summary"]["ours"], report["summary"]["trl"]
    # ours: means over seeds (0.35 + 0.25) / 2 = 0.30 and (0.45 + 0.40) / 2 = 0.425; trl 0.30 and 0.35
    assert ours["mean_curve"] == pytest.approx([0.25, 0.30, 0.425])
    assert trl["mean_curve"] == pytest.approx([0.25, 0.30, 0.35])
    assert ours["final_success_mean"] == pytest.approx(0.425)
    assert ours["trained_success_mean"] == pytest.approx((0.30 + 0.425) / 2)
    assert ours["curve_completions"] == [0, 640, 1280]
    # medians over all six steps: ours 0.4 0.5 0.6 0.7 0.8 0.9 -> 0.65; trl 1.0 1.5 2.0 2.0 2.5 3.0 -> 2.0
    assert ours["step_s_median"] == pytest.approx(0.65) and trl["step_s_median"] == pytest.approx(2.0)
    # start-up: the mean of the runs' (4.5 + 5.5) / 2
    assert ours["startup_s_mean"] == pytest.approx(5.0)
    assert report["verdict"] == {"curve_at_least_as_high": True, "step_faster": True}

    text = bench.markdown(report)
    assert "| ours | 1 | 0.250 | 0.350 | 0.450 | 0.600 | 4.5 |" in text
    assert "ours: mean rule success over the evaluations after step 0 0.36" in text
    assert "at the last 0.425; median step 0.650 s" in text
    assert "| **trl** | mean | **0.250** | **0.300** | **0.350** | **2.000** |" in text
    assert "at least as high at every evaluation: **yes**; our step faster: **yes**" in text


def test_verdict_fails_when_any_trained_point_is_lower(bench):
    runs = [fake_run("ours", 1, [0.2, 0.2, 0.5], [3.0]), fake_run("trl", 1, [0.3, 0.25, 0.4], [1.0])]
    report = bench.build_report(runs, {})
    # step 0 is not compared (same SFT model; noise of the sampling aside), step 10 is lower
    assert report["verdict"] == {"curve_at_least_as_high": False, "step_faster": False}
    assert "**no**; our step faster: **no**" in bench.markdown(report)
    assert bench.build_report(runs[:1], {})["verdict"] is None  # one trainer only: nothing to compare


def test_our_run_gets_the_matched_step3_settings(bench):
    from engine.config import Step3Config
    from engine.flags import parse_config

    args = bench.parse_args(["--sft_model", "sft", "--prompts_per_step", "4", "--group_size", "6",
                             "--learning_rate", "2e-4", "--max_answer_len", "12"])
    args.seed = 7
    cfg = parse_config(Step3Config, bench.our_argv(args, ROOT / "unused"))
    assert cfg.rl.advantage_estimator == "grpo" and cfg.rl.n_samples_per_prompt == 6
    assert cfg.rl.reward_funcs == [bench.RULE] and cfg.rl.loss_agg_mode == "token-mean"
    assert cfg.train.per_device_generation_batch_size == 4 and cfg.train.per_device_training_batch_size == 24
    assert cfg.train.actor_learning_rate == 2e-4 and cfg.train.lr_scheduler_type == "constant"
    assert cfg.train.num_warmup_steps == 0 and cfg.train.ppo_epochs == 1 and cfg.train.seed == 7
    assert (cfg.ppo.temperature, cfg.ppo.top_p, cfg.ppo.top_k) == (1.0, 1.0, 0)
    assert cfg.ppo.kl_ctl == 0 and cfg.rl.kl_loss_coef == 0 and cfg.ds.dtype == "fp32"
    assert not cfg.ds.actor_gradient_checkpointing and cfg.data.max_answer_seq_len == 12


def test_trl_config_matches_ours(bench):
    pytest.importorskip("trl", reason="TRL is an optional extra (pip install -e '.[trl]')")
    from engine.config import Step3Config
    from engine.flags import parse_config

    args = bench.parse_args(["--sft_model", "sft", "--prompts_per_step", "4", "--group_size", "6"])
    args.seed = 7
    ours = parse_config(Step3Config, bench.our_argv(args, ROOT / "unused"))
    trl = bench.trl_config(args, ROOT / "unused")
    assert trl.per_device_train_batch_size == 24 and trl.num_generations == 6  # TRL counts completions
    assert trl.gradient_accumulation_steps == trl.steps_per_generation == trl.num_iterations == 1
    assert trl.learning_rate == ours.train.actor_learning_rate and str(trl.lr_scheduler_type.value) == "constant"
    assert (trl.adam_beta1, trl.adam_beta2) == (ours.train.adam_beta1, ours.train.adam_beta2)
    assert trl.max_grad_norm == ours.ds.gradient_clipping and trl.weight_decay == ours.train.actor_weight_decay
    assert (trl.temperature, trl.top_p, trl.top_k) == (ours.ppo.temperature, ours.ppo.top_p, ours.ppo.top_k)
    assert trl.max_completion_length == ours.data.max_answer_seq_len and trl.seed == 7
    assert trl.beta == 0.0 and trl.loss_type == "dapo" and trl.scale_rewards == "group"
    assert not trl.bf16 and not trl.gradient_checkpointing
