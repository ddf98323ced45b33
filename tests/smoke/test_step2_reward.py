"""Step 2 end to end on the built-in tiny model and the bundled pairs, one process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics, tiny_model_folder, train_losses

pytestmark = pytest.mark.smoke

FAST = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "16", "--max_seq_len", "64"]


def reward_evals(folder: Path) -> list[dict]:
    return [r for r in read_metrics(folder) if "eval/reward_accuracy" in r]


@pytest.fixture(scope="module")
def rm_run(run_step, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm")
    run_step("step2_reward/main.py",
             ["--output_dir", str(out), *FAST, "--eval_interval", "25", "--num_train_epochs", "3"])
    return out


def test_reward_accuracy_rises(rm_run):
    evals = reward_evals(rm_run)
    assert [r["step"] for r in evals] == list(range(0, 301, 25))  # before and every 25 steps (300 is the end)
    assert 0.3 <= evals[0]["eval/reward_accuracy"] <= 0.7  # an untrained head is a coin flip
    # Measured on the 160 held-out pairs after 3 epochs from random weights: 0.894 (--seed 1234, the default),
    # 0.894 / 0.881 / 0.788 (seeds 1 / 2 / 3), 0.906 (seed 1234 on AVX2 kernels, as on another CPU); the bar
    # is the lowest less 2 binomial standard deviations (0.032 each). (1.0 after one epoch before the bundled
    # pairs gained the sorted-but-wrong-digit mistakes; see engine/data/sort_task.py.)
    assert evals[-1]["eval/reward_accuracy"] >= 0.72
    assert evals[-1]["eval/score_margin"] > 1.0
    stats = json.loads((rm_run / "reward_stats.json").read_text())
    assert stats["score_std"] > 0 and stats["eval_pairs"] == evals[-1]["eval/pairs"]
    assert stats["score_mean"] == pytest.approx(evals[-1]["eval/score_mean"])


def test_saved_folder_scores_the_same_in_plain_transformers(rm_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.models.reward_model import RewardModel

    model = AutoModelForSequenceClassification.from_pretrained(str(rm_run)).eval()
    tok = AutoTokenizer.from_pretrained(str(rm_run))
    texts = [" Human: sort 3 1 2 Assistant: 1 2 3<|endoftext|>", " Human: sort 9 8 Assistant: 9<|endoftext|>"]
    enc = tok(texts, return_tensors="pt", padding=True)  # right padding, different lengths
    with torch.no_grad():
        hf = model(**enc).logits.squeeze(-1)
        ours = RewardModel(model).scores(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(hf.float(), ours, rtol=0, atol=1e-6)
    assert hf[0] > hf[1]  # a correct sort outscores a wrong one
    # Step 3 loads the folder through the engine (as critic and as reward model): same scores.
    from engine.config import ModelArgs
    from engine.models.reward_model import load_reward_model

    engine_rm = load_reward_model(str(rm_run), ModelArgs(), tok, "bf16", None, False).eval()
    with torch.no_grad():
        torch.testing.assert_close(engine_rm.scores(enc["input_ids"], enc["attention_mask"]), hf.float(),
                                   rtol=0, atol=1e-6)


def test_lora_only_trains_adapters_and_value_head(run_step, tmp_path, engine_cache):
    out = tmp_path / "lora"
    run_step("step2_reward/main.py", ["--output_dir", str(out), *FAST, "--lora_dim", "4", "--only_optimize_lora",
                                      "--test_stop_step", "5"])
    base = load_file(str(tiny_model_folder(engine_cache) / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert "score.weight" in trained and "lm_head.weight" not in trained
    for key, value in trained.items():
        if key == "score.weight":
            continue  # new head: trained from its fresh init
        changed = not torch.equal(base[key].to(value.dtype), value)
        assert changed == key.endswith("proj.weight"), key


def test_span_loss_trains(run_step, tmp_path):
    out = tmp_path / "span"
    run_step("step2_reward/main.py", ["--output_dir", str(out), *FAST, "--rm_loss", "span", "--num_train_epochs", "3"])
    # Measured after 3 epochs: 0.856 (seed 1234), 0.819 / 0.894 / 0.863 (seeds 1 / 2 / 3), 0.838 (AVX2 kernels);
    # the bar is the lowest less 2 standard deviations of 160 pairs (0.03 each). (0.44 after 1 epoch: the span
    # loss learns end scores slower than the end loss.)
    assert reward_evals(out)[-1]["eval/reward_accuracy"] >= 0.75


def test_resume_after_kill_is_bit_identical(run_step, tmp_path):
    """25 steps straight == a run SIGKILLed in the middle of step 13, resumed from its step-10 checkpoint."""
    common = [*FAST, "--dropout", "0.1", "--save_interval", "5", "--test_stop_step", "25"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_step("step2_reward/main.py", ["--output_dir", str(straight), *common])
    killed = run_step("step2_reward/main.py", ["--output_dir", str(resumed), *common], check=False,
                      env={"RLHF_ENGINE_FAULT": "kill:13"})
    assert killed.returncode == -9 and max(train_losses(resumed)) == 12, killed.stderr[-2000:]
    run_step("step2_reward/main.py", ["--output_dir", str(resumed), *common, "--resume"])
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 26))
    assert [a[s] for s in range(11, 26)] == [b[s] for s in range(11, 26)]
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pairs_without_preference_are_a_clear_error(run_step, tmp_path):
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"prompt": f" Human: q{i} Assistant:", "chosen": " a", "rejected": " a"}) + "\n"
                            for i in range(20)))
    out = tmp_path / "out"
    # 20 rows, 2 held out as eval (10%), all 18 others in step 2's slice (--data_split 0,10,0).
    proc = run_step("step2_reward/main.py", ["--output_dir", str(out), "--data_path", str(data),
                                             "--data_split", "0,10,0"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no usable train preference pairs" in proc.stderr and "'identical': 18" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_nan_scores_stop_training_naming_the_step(run_step, tmp_path, engine_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_folder(engine_cache)
    poisoned = tmp_path / "poisoned"
    model = AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every hidden state gets a NaN feature
    model.save_pretrained(str(poisoned))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(poisoned))
    out = tmp_path / "out"
    proc = run_step("step2_reward/main.py", ["--output_dir", str(out), "--model_name_or_path", str(poisoned), *FAST,
                                             "--max_bad_steps", "2", "--save_interval", "1"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # Every step is bad (NaN scores, and bf16 skips the NaN update): the second in a row stops the run.
    assert ("error: step 2: 2 consecutive bad steps (the last: NaN or inf scores or loss and update skipped by the "
            "optimizer") in proc.stderr
    assert "no checkpoint was written before them" in proc.stderr and not list(out.glob("checkpoint-*"))
    rows = [r for r in read_metrics(out) if "train/bad_steps" in r]
    assert [(r["step"], r["train/bad_steps"], r["train/skipped_steps"]) for r in rows] == [(1, 1, 1), (2, 2, 2)]


def test_rw_eval_scores_pairs_and_prompts(rm_run, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((ROOT / "engine/assets/synthetic_sort/eval.jsonl").read_text().splitlines(True)[:20]))
    script = str(ROOT / "step2_reward/rw_eval.py")
    proc = subprocess.run([sys.executable, script, "--model_name_or_path", str(rm_run), "--data_file", str(pairs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wins = int(proc.stderr.split("pairwise accuracy: ")[1].split("/")[0])
    assert wins >= 14  # of 20
    proc = subprocess.run([sys.executable, script, "--model_name_or_path", str(rm_run), "--prompt",
                           " Human: sort 3 1 2 Assistant:", "--response", " 1 2 3", " 3 2 1"],
                          capture_output=True, text=True, timeout=300)
    scores = [float(line.split()[0]) for line in proc.stderr.splitlines() if line.strip().endswith("'")]
    assert len(scores) == 2 and scores[0] > scores[1]
    proc = subprocess.run([sys.executable, script, "--model_name_or_path", str(tmp_path / "nope"), "--prompt", "x",
                           "--response", "y"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "(the reward model): no such model folder" in proc.stderr and "give a step-2 --output_dir" in proc.stderr
