"""Hand-worked checks of the pure pieces of step 3's trainer: the running score moments of
--normalize_reward, the training-health warnings, the generation kwargs, and the step-3 throughput."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import engine.preflight as preflight
from engine.config import Step3Config
from engine.flags import make_config
from engine.observe.perf import calculate_flops, step3_throughput
from engine.ppo.health import LENGTH_COLLAPSE, RATIO_LIMIT, STD_COLLAPSE, TREND_WINDOW, health_warnings
from engine.ppo.trainer import generation_kwargs
from engine.rl.ppo import RunningMoments


# ----------------------------------------------------------------------------------------------
# RunningMoments
# ----------------------------------------------------------------------------------------------
def moments_of(*batches: list[float]) -> RunningMoments:
    m = RunningMoments()
    for b in batches:
        m.update(len(b), sum(b), sum(x * x for x in b))
    return m


def test_running_moments_hand_worked():
    # [1, 2, 3]: mean 2, m2 = 14 - 3 * 2^2 = 2.
    # then [10]: delta 8, mean = 2 + 8 / 4 = 4, m2 = 2 + 0 + 8^2 * 3 * 1 / 4 = 50.
    # [1, 2, 3, 10]: mean 4, squared deviations 9 + 4 + 1 + 36 = 50, population var 12.5.
    m = moments_of([1.0, 2.0, 3.0], [10.0])
    assert (m.count, m.mean, m.m2) == (4.0, 4.0, 50.0)
    assert m.std == pytest.approx(math.sqrt(12.5))
    data = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    assert m.std == pytest.approx(float(data.std(unbiased=False)))


def test_running_moments_batches_match_one_batch():
    data = [0.5, -1.5, 2.0, 7.0, 3.25, -4.0, 0.0]
    split = moments_of(data[:2], [], data[2:3], data[3:])
    whole = moments_of(data)
    t = torch.tensor(data, dtype=torch.float64)
    assert split.count == whole.count == 7
    assert split.mean == pytest.approx(float(t.mean())) == pytest.approx(whole.mean)
    assert split.std == pytest.approx(float(t.std(unbiased=False))) == pytest.approx(whole.std)


def test_running_moments_std_is_one_before_two_samples():
    assert RunningMoments().std == 1.0
    one = moments_of([5.0])
    assert (one.mean, one.std) == (5.0, 1.0)
    assert moments_of([5.0], [9.0]).std == pytest.approx(2.0)  # two samples: |5 - 9| / 2


def test_running_moments_state_dict_round_trip():
    m = moments_of([1.0, 2.0, 3.0])
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == {"count": 3.0, "mean": 2.0, "m2": 2.0}
    restored.update(1, 10.0, 100.0)
    assert (restored.mean, restored.m2) == (4.0, 50.0)


# ----------------------------------------------------------------------------------------------
# health_warnings
# ----------------------------------------------------------------------------------------------
def row(kl=1.0, score_std=1.0, score_mean=0.0, response_len=100.0, **extra) -> dict[str, float]:
    return {"rollout/kl": kl, "rollout/score_std": score_std, "rollout/score_mean": score_mean,
            "rollout/response_len": response_len, **extra}


def test_thresholds_are_the_documented_ones():
    assert (RATIO_LIMIT, STD_COLLAPSE, LENGTH_COLLAPSE, TREND_WINDOW) == (10.0, 0.05, 0.5, 5)


def test_healthy_history_has_no_warning():
    history = [row(score_mean=0.1 * i, response_len=100.0 - i, **{"ppo/ratio_max": 1.3}) for i in range(12)]
    assert health_warnings(history, kl_bound=10.0) == []


def test_kl_above_bound():
    assert health_warnings([row(kl=10.0)], kl_bound=10.0) == []  # strictly above
    [warning] = health_warnings([row(kl=10.5)], kl_bound=10.0)
    assert "--warn_kl_above" in warning and "10.5" in warning


def test_reward_std_collapse():
    # 0.05 * first std 2.0 = 0.1: 0.1 does not warn, 0.09 does.
    assert health_warnings([row(score_std=2.0), row(score_std=0.1)], kl_bound=10.0) == []
    [warning] = health_warnings([row(score_std=2.0), row(score_std=0.09)], kl_bound=10.0)
    assert "reward std collapsed" in warning
    # One step, or a first std of 0, has nothing to compare against.
    assert health_warnings([row(score_std=0.0)], kl_bound=10.0) == []
    assert health_warnings([row(score_std=0.0), row(score_std=0.0)], kl_bound=10.0) == []


def test_ratio_explosion():
    assert health_warnings([row(**{"ppo/ratio_max": 10.0})], kl_bound=10.0) == []
    [warning] = health_warnings([row(**{"ppo/ratio_max": 12.0})], kl_bound=10.0)
    assert "PPO ratio reached 12" in warning


def shrinking(score_now: float, len_now: float, n_before: int = TREND_WINDOW) -> list[dict[str, float]]:
    """n_before steps of score 1 and length 100, then TREND_WINDOW steps of score_now and len_now."""
    return [row(score_mean=1.0)] * n_before + [row(score_mean=score_now, response_len=len_now)] * TREND_WINDOW


def test_reward_rising_while_answers_shrink():
    # window means: score 1 -> 2 (rises), length 100 -> 49 < 0.5 * 100.
    [warning] = health_warnings(shrinking(2.0, 49.0), kl_bound=10.0)
    assert "reward hacking" in warning and "100" in warning and "49" in warning
    assert health_warnings(shrinking(2.0, 50.0), kl_bound=10.0) == []   # not below half
    assert health_warnings(shrinking(1.0, 10.0), kl_bound=10.0) == []   # score did not rise
    assert health_warnings(shrinking(2.0, 10.0, n_before=TREND_WINDOW - 1), kl_bound=10.0) == []  # too short


def test_trend_uses_only_the_last_two_windows():
    # before = steps 3..7 (length 100), now = steps 8..12 (length 49). Had the three old short steps
    # counted, "before" would average (3 * 10 + 5 * 100) / 8 = 66.25 and 49 would not be below half.
    history = [row(score_mean=3.0, response_len=10.0)] * 3 + shrinking(2.0, 49.0)
    assert len(health_warnings(history, kl_bound=10.0)) == 1


def test_all_warnings_at_once():
    history = [row(score_std=1.0)] * TREND_WINDOW + [row(score_mean=5.0, response_len=10.0, score_std=0.01)] * (
        TREND_WINDOW - 1) + [row(kl=50.0, score_mean=5.0, response_len=10.0, score_std=0.01, **{"ppo/ratio_max": 99.0})]
    assert len(health_warnings(history, kl_bound=10.0)) == 4


# ----------------------------------------------------------------------------------------------
# generation_kwargs
# ----------------------------------------------------------------------------------------------
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)


def test_generation_kwargs_greedy(cpu_only):
    cfg = make_config(Step3Config, {"do_sample": False, "temperature": 0.7, "max_answer_seq_len": 12})
    assert generation_kwargs(cfg, TOKENIZER) == {"max_new_tokens": 12, "do_sample": False,
                                                 "pad_token_id": 0, "eos_token_id": 1}


def test_generation_kwargs_sampling(cpu_only):
    cfg = make_config(Step3Config, {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_answer_seq_len": 12})
    assert generation_kwargs(cfg, TOKENIZER) == {"max_new_tokens": 12, "do_sample": True, "pad_token_id": 0,
                                                 "eos_token_id": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 5}


# ----------------------------------------------------------------------------------------------
# step3_throughput
# ----------------------------------------------------------------------------------------------
ACTOR = SimpleNamespace(num_hidden_layers=2, hidden_size=4, vocab_size=10)
CRITIC = SimpleNamespace(num_hidden_layers=1, hidden_size=4, vocab_size=10)


def throughput(**overrides) -> dict[str, float]:
    kwargs = dict(per_device_generation_batch=2, generation_batches=1, ppo_epochs=1, ptx=False, world_size=2,
                  seq_length=8, answer_len=4, actor_config=ACTOR, critic_config=CRITIC, actor_k=4.0,
                  critic_k=3.0, generate_s=2.0, train_s=1.0, e2e_s=4.0, actor_params=1000, bytes_per_param=2)
    return step3_throughput(**{**kwargs, **overrides})


def test_flops_of_one_sample_by_hand():
    # actor, k=4, s=8, L=2, h=4, V=10: 24*4*8*2*16 = 24576; * (1 + 8/24 + 10/128) = 24576 + 8192 + 1920
    assert calculate_flops(4.0, 1, 8, 2, 4, 10) == pytest.approx(34688.0)
    # critic, k=3, L=1: 24*3*8*1*16 = 9216; * (1 + 1/3 + 10/64) = 9216 + 3072 + 1440
    assert calculate_flops(3.0, 1, 8, 1, 4, 10) == pytest.approx(13728.0)
    # generation, k=1, B=2, actor shape: 2 * 24*8*2*16 * (...) = 2 * (6144 + 2048 + 480)
    assert calculate_flops(1.0, 2, 8, 2, 4, 10) == pytest.approx(17344.0)


def test_step3_throughput_hand_worked():
    # samples = 2 * 1 * 1 = 2; train flops = 2 * 34688 + 2 * 13728 = 96832; gen flops = 17344.
    out = throughput()
    assert out == pytest.approx({
        "perf/samples_per_s": 2 * 2 / 4.0,                     # global: samples * world / e2e
        "perf/train_tflops": 96832 / (1.0 * 1e12),
        "perf/gen_tflops": 17344 / (2.0 * 1e12),
        "perf/total_tflops": (96832 + 17344) / (4.0 * 1e12),
        "perf/gen_token_latency_s": 2.0 / 4,                   # generate_s / answer_len
        "perf/gen_bw_gb_s": 1000 * 2 / (0.5 * 1e9),
        "perf/e2e_s": 4.0,
    })


def test_step3_throughput_ptx_doubles_the_samples_and_the_actor_flops():
    # DeepSpeed-Chat's `... * 1 if no PTX else 2` made the samples 2 with PTX; here 2 * 2 = 4.
    plain, ptx = throughput(per_device_generation_batch=3), throughput(per_device_generation_batch=3, ptx=True)
    assert ptx["perf/samples_per_s"] == pytest.approx(3 * 2 * 2 / 4.0)
    assert ptx["perf/samples_per_s"] == pytest.approx(2 * plain["perf/samples_per_s"])
    # the actor trains on the PTX batches too, the critic does not: 3 * (2 * 34688 + 13728) vs 3 * (34688 + 13728)
    assert ptx["perf/train_tflops"] == pytest.approx(3 * (2 * 34688 + 13728) / 1e12)
    assert plain["perf/train_tflops"] == pytest.approx(3 * (34688 + 13728) / 1e12)
    assert ptx["perf/gen_tflops"] == pytest.approx(plain["perf/gen_tflops"])  # generation is not doubled


def test_step3_throughput_generation_batches_and_epochs():
    # samples = 2 * 2 * 3 = 12; train flops = 12 * (34688 + 13728) = 580992; generation counted twice.
    out = throughput(generation_batches=2, ppo_epochs=3)
    assert out["perf/samples_per_s"] == pytest.approx(12 * 2 / 4.0)
    assert out["perf/train_tflops"] == pytest.approx(580992 / 1e12)
    assert out["perf/total_tflops"] == pytest.approx((580992 + 2 * 17344) / (4.0 * 1e12))


def test_step3_throughput_zero_answer_len_counts_as_one():
    out = throughput(answer_len=0)
    assert out["perf/gen_token_latency_s"] == pytest.approx(2.0)
    assert out["perf/gen_bw_gb_s"] == pytest.approx(2000 / (2.0 * 1e9))


@pytest.mark.parametrize("bad", [{"generate_s": 0.0}, {"train_s": -1.0}, {"e2e_s": 0.0}])
def test_step3_throughput_rejects_non_positive_times(bad):
    with pytest.raises(ValueError, match="> 0"):
        throughput(**bad)


def test_gen_token_latency_divides_by_the_mean_answer_length_of_all_ranks(monkeypatch):
    """Step 3 passes `rollout/response_len` (all ranks' real answers) to step3_throughput, not rank 0's padded
    width; here rank 1's sums join rank 0's through a stand-in for the all-reduce."""
    import step3_rlhf.main as step3
    from engine.runtime.distributed import DistInfo

    def stats(lengths: list[float]) -> dict[str, torch.Tensor]:
        n = len(lengths)
        return {"score": torch.ones(n), "kl": torch.zeros(n), "response_len": torch.tensor(lengths),
                "value_mean": torch.zeros(n), "nonfinite": torch.zeros(n)}

    # rank 0: answers of 2 and 6 tokens (its batch is 6 wide); rank 1: 1 and 3 tokens.
    rank1 = [2.0, 4.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0]  # n, score, score^2, kl, length, value, empty, nonfinite
    monkeypatch.setattr(step3, "all_reduce_sum", lambda values, device: [a + b for a, b in zip(values, rank1)])
    row = step3.rollout_stats([stats([2.0, 6.0])], DistInfo(rank=0, local_rank=0, world_size=2,
                                                            device=torch.device("cpu")))
    assert row["rollout/response_len"] == pytest.approx((2 + 6 + 1 + 3) / 4)  # 3 tokens, not rank 0's width 6
    out = throughput(answer_len=row["rollout/response_len"])
    assert out["perf/gen_token_latency_s"] == pytest.approx(2.0 / 3)  # generate_s 2.0 / 3 tokens
    import inspect  # and ppo_step passes that row's mean, whatever its neighbours compute

    assert 'answer_len=row["rollout/response_len"]' in inspect.getsource(step3.ppo_step)
