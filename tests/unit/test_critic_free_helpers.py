"""The pure helpers of step 3's critic-free path: the per-rank sampling seed, the rollout metrics, row slicing."""
import pytest
import torch

from engine.ppo.metrics import critic_free_rollout_stats
from engine.ppo.trainer import rollout_seed
from engine.runtime.distributed import DistInfo
from step3_rlhf.main import head_rows

ONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_rollout_seed_differs_per_rank_step_and_draw_and_is_reproducible():
    seeds = {rollout_seed(1234, rank, step, draw) for rank in range(4) for step in range(50) for draw in range(3)}
    assert len(seeds) == 4 * 50 * 3
    assert rollout_seed(1234, 1, 7, 0) == rollout_seed(1234, 1, 7, 0)
    assert rollout_seed(1234, 1, 7) != rollout_seed(1235, 1, 7)
    assert all(0 <= s < 2 ** 63 for s in seeds)  # torch.manual_seed's range


def test_rollout_stats_hand_worked():
    # One batch of 2 groups of 2: rewards [1, 0 | 1, 1]; the second group is flat (frac 0.5).
    per_seq = [{"score": torch.tensor([1.0, 0.0, 1.0, 1.0]), "kl": torch.tensor([0.2, 0.0, 0.4, 0.2]),
                "response_len": torch.tensor([2.0, 4.0, 1.0, 1.0]), "truncated": torch.tensor([0.0, 1.0, 0.0, 0.0])}]
    extras = [{"advantages": {"frac_reward_zero_std": torch.tensor(0.5), "advantage_min": torch.tensor(-0.7),
                              "advantage_max": torch.tensor(0.7)},
               "fn_values": torch.tensor([[1.0, 2.0], [0.0, float("nan")], [1.0, 4.0], [1.0, 6.0]])}]
    row = critic_free_rollout_stats(per_seq, extras, ["rule", "length"], 2, ONE)
    assert row["rollout/reward_mean"] == pytest.approx(0.75)
    assert row["rollout/reward_std"] == pytest.approx((0.75 - 0.75 ** 2) ** 0.5)  # population std
    assert row["rollout/frac_reward_zero_std"] == pytest.approx(0.5)
    assert row["rollout/kl_per_token"] == pytest.approx(0.8 / 8)  # KL summed over 8 answer tokens
    assert row["rollout/response_len_max"] == 4 and row["rollout/frac_truncated"] == pytest.approx(0.25)
    assert (row["rollout/advantage_min"], row["rollout/advantage_max"]) == pytest.approx((-0.7, 0.7))
    assert row["reward/rule_mean"] == pytest.approx(0.75)
    # length scored 3 rows (None on row 1): mean 4, population std sqrt(8/3).
    assert row["reward/length_mean"] == pytest.approx(4.0)
    assert row["reward/length_std"] == pytest.approx((8 / 3) ** 0.5)


def test_head_rows_cuts_tensors_texts_and_columns():
    batch = {"input_ids": torch.arange(6).view(3, 2), "attention_mask": torch.ones(3, 2), "prompts": ["a", "b", "c"],
             "columns": {"answer": [1, 2, 3]}}
    out = head_rows(batch, 2)
    assert out["input_ids"].tolist() == [[0, 1], [2, 3]] and out["prompts"] == ["a", "b"]
    assert out["columns"] == {"answer": [1, 2]}


def _exp(rows: int, length: int, mark: float):
    from engine.ppo.experience import Experience
    seq = torch.full((rows, length), 7)
    per_action = torch.full((rows, length - 1), mark)
    return Experience(seq, torch.ones(rows, length), torch.ones(rows, length - 1), per_action, per_action,
                      per_action, torch.arange(rows, dtype=torch.float), per_action, per_action, per_action)


def test_fill_with_groups_takes_informative_groups_first_then_tops_up_with_flat_ones():
    from engine.ppo.experience import fill_with_groups

    first, second = _exp(4, 5, 1.0), _exp(4, 3, 2.0)  # groups of 2; the second batch's answers are shorter
    keep = [torch.tensor([False, False, True, True]), torch.tensor([True, True, False, False])]
    out, flat = fill_with_groups([first, second], keep, 2, 4, pad_id=0)
    # rows 2-3 of the first batch, then rows 0-1 of the second (padded from 3 to 5 tokens)
    assert out.scores.tolist() == [2.0, 3.0, 0.0, 1.0] and flat == 0
    assert out.sequences[2:].tolist() == [[7, 7, 7, 0, 0]] * 2 and out.attention_mask[2:, 3:].sum() == 0
    assert out.advantages[:2].eq(1.0).all() and out.advantages[2:, :2].eq(2.0).all()
    assert out.advantages[2:, 2:].eq(0).all()
    short, flat = fill_with_groups([first], [keep[0]], 2, 4, pad_id=0)
    assert short.scores.tolist() == [2.0, 3.0, 0.0, 1.0] and flat == 1  # one flat group fills the batch
