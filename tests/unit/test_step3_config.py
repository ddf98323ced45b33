"""Step-3 config: DeepSpeed-Chat's flag names and defaults, the per-role views the loaders use, and
validation that raises a UserError naming the offending flag (never rewrites).

The defaults are those of DeepSpeed-Chat's step-3 `parse_args` (DeepSpeedExamples,
applications/DeepSpeed-Chat/training/step3_rlhf_finetuning/main.py) and the PPO coefficients it
hard-codes in `DeepSpeedPPOTrainer.__init__` (kl_ctl 0.1, clip_reward_value 5, cliprange 0.2,
cliprange_value 0.2, gamma 1, lam 0.95).
"""
from __future__ import annotations

import pytest

import engine.preflight as preflight
from engine.config import DataArgs, LoRAArgs, ModelArgs, Step3Config
from engine.errors import UserError
from engine.flags import make_config, parse_config


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """A CPU-only machine unless a test says otherwise, so dtype defaults and GPU checks are fixed."""
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)


def problems(err: UserError) -> list[str]:
    """The '  - ...' lines of a validation error."""
    return [line for line in str(err).splitlines() if line.startswith("  - ")]


# ----------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------
DSCHAT_DEFAULTS = {
    # PPO coefficients DeepSpeed-Chat hard-codes, plus the EMA decay of utils.moving_average.
    ("ppo", "kl_ctl"): 0.1, ("ppo", "clip_reward_value"): 5.0, ("ppo", "gamma"): 1.0, ("ppo", "lam"): 0.95,
    ("ppo", "cliprange"): 0.2, ("ppo", "cliprange_value"): 0.2, ("ppo", "entropy_coef"): 0.0,
    ("ppo", "ema_decay"): 0.992,
    # Step-3 main.py flags.
    ("data", "unsup_coef"): 27.8, ("data", "max_prompt_seq_len"): 256, ("data", "max_answer_seq_len"): 256,
    ("train", "actor_learning_rate"): 9.65e-6, ("train", "critic_learning_rate"): 5e-6,
    ("train", "num_warmup_steps"): 100, ("train", "per_device_generation_batch_size"): 16,
    ("train", "per_device_training_batch_size"): 16, ("train", "generation_batches"): 1,
    ("train", "ppo_epochs"): 1, ("ds", "inference_tp_size"): 1, ("ds", "tp_gather_partition_size"): 8,
}


@pytest.mark.parametrize("where, expected", DSCHAT_DEFAULTS.items(), ids=lambda x: str(x))
def test_default_equals_deepspeed_chat(where, expected):
    part, name = where
    assert getattr(getattr(make_config(Step3Config), part), name) == expected


def test_no_flags_is_the_same_as_make_config_defaults():
    assert parse_config(Step3Config, []) == make_config(Step3Config)


# ----------------------------------------------------------------------------------------------
# Validation: each invalid combination names its flag
# ----------------------------------------------------------------------------------------------
INVALID = [
    # 16 prompts per generation batch cannot be cut into micro-batches of 6.
    ({"per_device_generation_batch_size": 16, "per_device_training_batch_size": 6}, "--per_device_training_batch_size"),
    ({"offload": True, "actor_zero_stage": 1, "critic_zero_stage": 2}, "--offload"),
    ({"offload": True, "actor_zero_stage": 3, "critic_zero_stage": 0}, "--offload"),
    ({"offload_reference_model": True, "actor_zero_stage": 2}, "--offload_reference_model"),
    ({"offload_reward_model": True, "critic_zero_stage": 2}, "--offload_reward_model"),
    ({"inference_tp_size": 0}, "--inference_tp_size"),
    ({"tp_gather_partition_size": 0}, "--tp_gather_partition_size"),
    ({"unpin_actor_parameters": True}, "--unpin_actor_parameters"),
    ({"release_inference_cache": True}, "--release_inference_cache"),
    ({"enable_mixed_precision_lora": True, "actor_zero_stage": 3}, "--enable_mixed_precision_lora"),
    ({"align_overflow": True, "dtype": "bf16"}, "--align_overflow"),
    ({"enable_test_mode": True}, "--enable_test_mode"),
    ({"unsupervised_dataset_config_name": "wikitext-2-raw-v1"}, "--unsupervised_dataset_config_name"),
    ({"gamma": 1.5}, "--gamma"),
    ({"lam": -0.1}, "--lam"),
    ({"top_p": 0.0}, "--top_p"),
    ({"temperature": 0.0}, "--temperature"),
    ({"ema_decay": 2.0}, "--ema_decay"),
    ({"target_kl": 0.0}, "--target_kl"),
    ({"actor_lora_dim": -1}, "--actor_lora_dim"),
    ({"critic_lora_dim": -8}, "--critic_lora_dim"),
    ({"actor_dropout": 1.0}, "--actor_dropout"),
    ({"critic_dropout": -0.1}, "--critic_dropout"),
    ({"only_optimize_lora": True}, "--only_optimize_lora"),
    ({"unsup_coef": -1.0}, "--unsup_coef"),
    ({"ppo_epochs": 0}, "--ppo_epochs"),
    ({"print_answers_interval": 0}, "--print_answers_interval"),
    ({"eval_prompts": -1}, "--eval_prompts must be >= 0"),
    ({"eval_prompts": 0, "eval_interval": 5}, "--eval_interval 5 asks for evaluations that --eval_prompts 0"),
    # QLoRA: a 4-bit actor trains LoRA only, and ZeRO-3 cannot partition bitsandbytes weights.
    ({"actor_quantization": "4bit"}, "--actor_lora_dim 8 (or another rank > 0) and --only_optimize_lora"),
    ({"actor_quantization": "4bit", "actor_lora_dim": 8}, "--only_optimize_lora"),
    ({"actor_quantization": "4bit", "actor_lora_dim": 8, "only_optimize_lora": True, "actor_zero_stage": 3},
     "--actor_quantization 4bit needs --actor_zero_stage 0, 1 or 2"),
    # A quantized frozen role is not partitioned, so there is nothing for ZeRO-3 to offload.
    ({"reference_quantization": "8bit", "offload_reference_model": True, "actor_zero_stage": 3},
     "--reference_quantization and --offload_reference_model exclude each other"),
    ({"reward_quantization": "4bit", "offload_reward_model": True, "critic_zero_stage": 3},
     "--reward_quantization and --offload_reward_model exclude each other"),
]


@pytest.mark.parametrize("values, flag", INVALID, ids=[f for _, f in INVALID])
def test_invalid_combination_raises_one_problem_naming_the_flag(values, flag):
    with pytest.raises(UserError) as info:
        make_config(Step3Config, values)
    found = problems(info.value)
    assert len(found) == 1, found
    assert flag in found[0]


def test_a_shared_check_runs_per_role_with_the_role_flags():
    # ModelArgs' dropout range and LoRAArgs' learning-rate check, named with each role's flag; a problem
    # both roles share is one line.
    with pytest.raises(UserError) as info:
        make_config(Step3Config, {"actor_dropout": 1.5, "critic_dropout": 1.5, "critic_lora_learning_rate": 0.0})
    assert problems(info.value) == ["  - --actor_dropout and --critic_dropout must be in [0, 1) (got 1.5)",
                                    "  - --critic_lora_learning_rate must be > 0 (got 0.0)"]
    # --only_optimize_lora needs LoRA in one role, not in both.
    assert make_config(Step3Config, {"only_optimize_lora": True, "critic_lora_dim": 8}).lora.only_optimize_lora


def test_all_problems_are_listed_together():
    with pytest.raises(UserError) as info:
        make_config(Step3Config, {"gamma": 1.5, "inference_tp_size": 0, "enable_test_mode": True})
    assert len(problems(info.value)) == 3


@pytest.mark.parametrize("values", [
    {"per_device_generation_batch_size": 16, "per_device_training_batch_size": 8, "gradient_accumulation_steps": 2},
    # 8 x 2 generation batches / 4 = 4 micro-batches per step, a multiple of 4.
    {"per_device_generation_batch_size": 8, "per_device_training_batch_size": 4, "generation_batches": 2,
     "gradient_accumulation_steps": 4},
    {"offload": True, "actor_zero_stage": 2, "critic_zero_stage": 3},
    {"offload_reference_model": True, "offload_reward_model": True, "actor_zero_stage": 3, "critic_zero_stage": 3},
    {"unpin_actor_parameters": True, "release_inference_cache": True, "enable_hybrid_engine": True},
    {"enable_test_mode": True, "test_stop_step": 3},
    {"eval_prompts": 0},  # no evaluation, as DeepSpeed-Chat's step 3
    {"gamma": 0.0, "lam": 1.0, "top_p": 1.0, "ema_decay": 1.0, "target_kl": 6.0, "actor_dropout": 0.0},
    # Quantized frozen roles beside ZeRO-3 partners (they are whole on each rank), fp32 included.
    {"reference_quantization": "4bit", "reward_quantization": "8bit", "actor_zero_stage": 3, "critic_zero_stage": 3,
     "offload_reward_model": False, "dtype": "fp32"},
    # QLoRA at ZeRO-2 with the hybrid mode (which generates with the 4-bit module itself) and the EMA.
    {"actor_quantization": "4bit", "actor_lora_dim": 8, "only_optimize_lora": True, "actor_zero_stage": 2,
     "enable_hybrid_engine": True, "enable_ema": True, "dtype": "fp32"},
])
def test_boundary_values_are_accepted(values):
    make_config(Step3Config, values)


@pytest.mark.parametrize("values, per_step", [
    ({}, 1),
    # 16 / 8 = 2 micro-batches per generation batch; a window of 4 needs 2 of them (DeepSpeed-Chat accumulates
    # across experience batches; once refused here).
    ({"per_device_generation_batch_size": 16, "per_device_training_batch_size": 8,
      "gradient_accumulation_steps": 4}, 2),
    # DeepSpeed-Chat's opt/single_gpu step-3 shape: 1 micro-batch per generation batch, accumulation 2.
    ({"gradient_accumulation_steps": 2}, 2),
    # 3 rounds of --generation_batches 2 (2 micro-batches each) make 6 micro-batches, 2 windows of 3.
    ({"per_device_generation_batch_size": 4, "per_device_training_batch_size": 4, "generation_batches": 2,
      "gradient_accumulation_steps": 3}, 6),
    # Whole windows already: unchanged.
    ({"per_device_generation_batch_size": 8, "per_device_training_batch_size": 4, "generation_batches": 2,
      "gradient_accumulation_steps": 4}, 2),
])
def test_accumulation_across_generation_batches(values, per_step):
    cfg = make_config(Step3Config, values)
    assert cfg.step_generation_batches == per_step
    t = cfg.train
    micro = t.per_device_generation_batch_size * per_step // t.per_device_training_batch_size
    assert micro % t.gradient_accumulation_steps == 0  # every PPO step ends on an optimizer step


def test_tensor_parallel_flags_are_accepted_with_a_notice():
    assert make_config(Step3Config).compat_notices(cuda=False) == []
    cfg = parse_config(Step3Config, ["--inference_tp_size", "2", "--actor_zero_stage", "3"])
    notice, = cfg.compat_notices(cuda=False)
    assert "--inference_tp_size 2" in notice and "no effect" in notice and "full actor" in notice
    assert len(parse_config(Step3Config, ["--tp_gather_partition_size", "4"]).compat_notices(cuda=False)) == 1


def test_quantization_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(preflight, "missing_quantization_packages", lambda: ["bitsandbytes"])
    make_config(Step3Config)  # no quantization asked: nothing is needed
    with pytest.raises(UserError) as info:
        make_config(Step3Config, {"reference_quantization": "8bit", "reward_quantization": "4bit"})
    assert problems(info.value) == ["  - --reference_quantization and --reward_quantization need bitsandbytes, "
                                    "which is not installed: pip install bitsandbytes"]


def test_mixed_precision_lora_on_cpu_is_a_warned_no_op(monkeypatch):
    """DeepSpeed-Chat's _mixz scripts (and its sweep's MixZ++ + hybrid point) run on a CPU: the flag is
    accepted, warned about, and the actor's DeepSpeed config asks for no quantized weights."""
    from engine.models import roles

    monkeypatch.setattr(roles, "gpu_wanted", lambda: False)
    base = {"enable_mixed_precision_lora": True, "actor_zero_stage": 3, "actor_lora_dim": 8, "dtype": "bf16"}
    for cfg in (make_config(Step3Config, base), make_config(Step3Config, {**base, "enable_hybrid_engine": True})):
        notice, = cfg.compat_notices(cuda=False)
        assert "--enable_mixed_precision_lora has no effect" in notice
        zero = roles.actor_ds_config(cfg, 2, ptx=False)["zero_optimization"]
        assert "zero_quantized_nontrainable_weights" not in zero
    assert make_config(Step3Config, base).compat_notices(cuda=True) == []
    monkeypatch.setattr(roles, "gpu_wanted", lambda: True)
    assert roles.actor_ds_config(make_config(Step3Config, base), 2, ptx=False)["zero_optimization"][
        "zero_quantized_nontrainable_weights"] is True


def test_mixed_precision_lora_on_gpu_accepted_with_and_without_hybrid(monkeypatch):
    """DeepSpeed-Chat's step-3 sweep runs MixZ++ with and without the hybrid engine; both run here
    (tests/distributed/test_hybrid_generation.py checks the pair on CPU ranks)."""
    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    base = {"enable_mixed_precision_lora": True, "actor_zero_stage": 3, "actor_lora_dim": 8}
    assert make_config(Step3Config, base).ds.dtype == "fp16"
    assert make_config(Step3Config, {**base, "enable_hybrid_engine": True}).ds.enable_hybrid_engine


def test_align_overflow_accepted_with_fp16_and_zero(monkeypatch):
    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    make_config(Step3Config, {"align_overflow": True, "dtype": "fp16", "actor_zero_stage": 1, "critic_zero_stage": 2})
    with pytest.raises(UserError, match="--actor_zero_stage and --critic_zero_stage >= 1"):
        make_config(Step3Config, {"align_overflow": True, "dtype": "fp16", "critic_zero_stage": 2})


def test_sft_only_data_path_is_not_a_step3_flag():
    with pytest.raises(UserError, match="--sft_only_data_path"):
        parse_config(Step3Config, ["--sft_only_data_path", "a.jsonl"])
    with pytest.raises(UserError, match="sft_only_data_path"):
        make_config(Step3Config, {"sft_only_data_path": ["a.jsonl"]})


def test_bad_choice_on_command_line_is_a_user_error():
    with pytest.raises(UserError, match="--actor_zero_stage"):
        parse_config(Step3Config, ["--actor_zero_stage", "4"])
    with pytest.raises(UserError, match="--actor_quantization"):  # 8-bit is for the frozen roles only
        parse_config(Step3Config, ["--actor_quantization", "8bit"])


# ----------------------------------------------------------------------------------------------
# Per-role views and DeepSpeed-Chat argv
# ----------------------------------------------------------------------------------------------
def test_role_views_map_per_role_flags():
    cfg = make_config(Step3Config, {
        "actor_model_name_or_path": "sft", "critic_model_name_or_path": "rm", "actor_dropout": 0.0,
        "critic_dropout": 0.1, "attn_implementation": "eager", "actor_lora_dim": 64, "critic_lora_dim": 8,
        "actor_lora_module_name": "layers.", "critic_lora_module_name": "mlp", "only_optimize_lora": True,
        "actor_lora_learning_rate": 1e-4, "critic_lora_learning_rate": 2e-4, "lora_scaling": 2.0,
        "data_path": ["a.jsonl", "b.jsonl"], "data_split": "0,0,1", "data_output_path": "cache",
        "add_eot_token": True, "eot_token": "<eot>"})
    assert cfg.role_model("actor") == ModelArgs(model_name_or_path="sft", dropout=0.0, attn_implementation="eager")
    assert cfg.role_model("critic") == ModelArgs(model_name_or_path="rm", dropout=0.1, attn_implementation="eager")
    assert cfg.role_lora("actor") == LoRAArgs(lora_dim=64, lora_module_name="layers.", only_optimize_lora=True,
                                              lora_learning_rate=1e-4, lora_scaling=2.0)
    assert cfg.role_lora("critic") == LoRAArgs(lora_dim=8, lora_module_name="mlp", only_optimize_lora=True,
                                               lora_learning_rate=2e-4, lora_scaling=2.0)
    data = cfg.data_args()
    assert data == DataArgs(data_path=["a.jsonl", "b.jsonl"], data_split="0,0,1", data_output_path="cache",
                            add_eot_token=True, eot_token="<eot>")
    data.data_path.append("c.jsonl")  # a copy: the config is never mutated through the view
    assert cfg.data.data_path == ["a.jsonl", "b.jsonl"]


def test_deepspeed_chat_llama2_lora_argv_parses():
    # training_scripts/llama2/run_llama2_7b_lora.sh, with the tiny batch sizes it uses.
    argv = ("--data_path Dahoas/rm-static --data_split 2,4,4 --actor_model_name_or_path sft "
            "--critic_model_name_or_path rm --num_padding_at_beginning 1 --per_device_generation_batch_size 1 "
            "--per_device_training_batch_size 1 --generation_batches 1 --ppo_epochs 1 --max_answer_seq_len 256 "
            "--max_prompt_seq_len 256 --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 "
            "--actor_weight_decay 0.1 --critic_weight_decay 0.1 --num_train_epochs 1 --lr_scheduler_type cosine "
            "--gradient_accumulation_steps 1 --actor_gradient_checkpointing --critic_gradient_checkpointing "
            "--offload_reference_model --actor_dropout 0.0 --num_warmup_steps 100 --deepspeed --seed 1234 "
            "--actor_zero_stage 3 --critic_zero_stage 3 --enable_hybrid_engine --actor_lora_dim 64 "
            "--critic_lora_dim 64 --actor_lora_module_name layers. --critic_lora_module_name layers. "
            "--output_dir out --local_rank 0").split()
    cfg = parse_config(Step3Config, argv)
    assert (cfg.ds.actor_zero_stage, cfg.ds.critic_zero_stage) == (3, 3)
    assert cfg.ds.enable_hybrid_engine and cfg.ds.offload_reference_model and cfg.ds.deepspeed
    assert cfg.lora.actor_lora_dim == 64 and cfg.lora.actor_lora_module_name == "layers."
    assert cfg.train.actor_weight_decay == 0.1 and cfg.model.actor_dropout == 0.0
    assert cfg.data.data_path == ["Dahoas/rm-static"] and cfg.log.output_dir == "out"
    assert cfg.role_lora("critic").lora_dim == 64


# Step-3 and step-1/2 flags whose defaults differ from DeepSpeed-Chat's, and the words of their help that say
# how to get its behaviour.
DIFFERENT_DEFAULTS = {
    (Step3Config, "do_sample"): "--no-do_sample", (Step3Config, "top_k"): "--top_k 50",
    (Step3Config, "eval_prompts"): "0: no evaluation", (Step3Config, "seed"): "DeepSpeed-Chat's step 3",
    (Step3Config, "dtype"): "DeepSpeed-Chat's default", (Step3Config, "whiten_advantages"): "DeepSpeed-Chat: no",
    (Step3Config, "actor_lora_module_name"): "'auto'",
}


def _help(config: type, name: str) -> str:
    import dataclasses

    for part in dataclasses.fields(config):
        for f in dataclasses.fields(part.default_factory()):
            if f.name == name:
                return f.metadata["help"]
    raise KeyError(name)


@pytest.mark.parametrize("where, words", DIFFERENT_DEFAULTS.items(), ids=lambda x: str(x))
def test_help_of_a_default_that_differs_from_deepspeed_chat_says_how_to_get_its(where, words):
    text = _help(*where)
    assert words in text and ("DeepSpeed-Chat" in text or "Default: fp16" in text), text


def test_step_1_and_2_help_name_their_deepspeed_chat_differences():
    from engine.config import Step1Config, Step2Config

    assert "as DeepSpeed-Chat does" in _help(Step1Config, "train_on_prompt")
    assert "--rm_loss span for its behaviour" in _help(Step2Config, "rm_loss")
    assert "DeepSpeed-Chat" in _help(Step1Config, "data_output_path")
