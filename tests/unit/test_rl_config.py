"""The critic-free part of step 3's config (`RLArgs`) and the predicates roles and checkpoints use."""
import pytest

from engine import config as config_module
from engine.config import Step3Config
from engine.errors import UserError
from engine.flags import make_config
from engine.rl import advantages, losses

GRPO = {"advantage_estimator": "grpo", "n_samples_per_prompt": 4, "reward_funcs": ["engine.rewards.builtin:sort_rule"],
        "per_device_generation_batch_size": 2, "per_device_training_batch_size": 4}


def test_names_match_the_rl_library():
    assert config_module.ESTIMATOR_NAMES == advantages.ESTIMATOR_NAMES
    assert set(config_module.GROUP_ESTIMATORS) == advantages.GROUP_ESTIMATORS
    assert config_module.LOSS_AGG_MODES == losses.LOSS_AGG_MODES


def test_defaults_are_todays_ppo():
    cfg = make_config(Step3Config)
    assert (cfg.critic_free, cfg.needs_reference, cfg.needs_reward_model) == (False, True, True)
    assert cfg.rl.n_samples_per_prompt == 1 and cfg.rl.reward_funcs == []


def test_predicates():
    cfg = make_config(Step3Config, GRPO)
    assert cfg.critic_free and cfg.needs_reference and not cfg.needs_reward_model and not cfg.needs_critic_folder
    no_kl = make_config(Step3Config, GRPO | {"kl_ctl": 0.0})
    assert not no_kl.needs_reference
    kl_loss = make_config(Step3Config, GRPO | {"kl_ctl": 0.0, "kl_loss_coef": 0.001})
    assert kl_loss.needs_reference
    with_rm = make_config(Step3Config, GRPO | {"critic_model_name_or_path": "output/step2_reward"})
    assert with_rm.needs_reward_model and with_rm.needs_critic_folder


def test_accumulation_longer_than_a_step_collects_more_generation_batches():
    # 2 prompts x 4 answers / 4 = 2 micro-batches per generation batch; windows of 3 need 3 of them.
    assert make_config(Step3Config, GRPO | {"gradient_accumulation_steps": 3}).step_generation_batches == 3


@pytest.mark.parametrize("values, fragment", [
    ({"advantage_estimator": "rloo"}, "--n_samples_per_prompt 2 or more"),
    (GRPO | {"per_device_generation_batch_size": 3, "per_device_training_batch_size": 8},
     "= 12 answers per rank, which --per_device_training_batch_size 8 does not divide; use one of 1, 2, 3, 4, 6, 12"),
    (GRPO | {"policy_loss": "gspo"}, "needs --loss_agg_mode seq-mean-token-mean"),
    (GRPO | {"reward_weights": [1.0, 2.0]}, "--reward_weights has 2 values but --reward_funcs names 1"),
    (GRPO | {"dual_clip_c": 0.5}, "--dual_clip_c must be > 1"),
    (GRPO | {"cliprange_high": 0.0}, "--cliprange_high must be > 0"),
    ({"n_samples_per_prompt": 2}, "only critic-free estimators use"),
    ({"advantage_estimator": "reinforce_pp", "dynamic_sampling": True}, "--dynamic_sampling"),
    (GRPO | {"kl_loss_coef": -1.0}, "--kl_loss_coef"),
])
def test_refused(values, fragment):
    with pytest.raises(UserError, match="invalid configuration") as err:
        make_config(Step3Config, values)
    assert fragment in str(err.value)


def test_groups_need_not_fit_one_micro_batch():
    # 2 prompts x 4 answers = 8 rows per rank, micro-batches of 4 (a group may span micro-batches; advantages
    # are computed before the split) and of 8.
    make_config(Step3Config, GRPO)
    make_config(Step3Config, GRPO | {"per_device_training_batch_size": 8})
    make_config(Step3Config, {"advantage_estimator": "reinforce_pp"})  # works with one answer per prompt
