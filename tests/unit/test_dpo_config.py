"""DPO's configuration: DeepSpeed-Chat's DPO command line parses with its meanings; the reference mode `auto`
resolves to."""
from __future__ import annotations

from engine.config import DPOConfig
from engine.flags import build_config, parse_config

# Every flag of DeepSpeed-Chat's training/step2_dpo_finetuning/main.py (its parse_args), with a value.
DSCHAT_DPO = ("--data_path Dahoas/rm-static Dahoas/synthetic-instruct-gptj-pair --data_split 2,4,4 "
              "--data_output_path /tmp/data_files/ --model_name_or_path facebook/opt-350m "
              "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --max_seq_len 512 --learning_rate 1e-6 "
              "--weight_decay 0.1 --num_train_epochs 1 --beta 0.2 --label_smoothing 0.1 "
              "--gradient_accumulation_steps 2 --lr_scheduler_type cosine --num_warmup_steps 10 --output_dir out "
              "--seed 42 --local_rank 0 --gradient_checkpointing --dropout 0.0 --offload --dtype bf16 "
              "--offload_reference_model --zero_stage 3 --lora_dim 128 --lora_module_name decoder.layers. "
              "--only_optimize_lora --lora_learning_rate 5e-4 --compute_fp32_loss --enable_tensorboard "
              "--tensorboard_path tb --add_eot_token --print_loss --deepspeed")


def test_deepspeed_chat_dpo_command_line_parses_with_its_meaning():
    cfg = parse_config(DPOConfig, DSCHAT_DPO.split())
    assert (cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.dpo_loss) == (0.2, 0.1, "sigmoid")
    assert cfg.dpo.offload_reference_model and cfg.ds.zero_stage == 3 and cfg.ds.offload
    assert (cfg.lora.lora_dim, cfg.lora.only_optimize_lora, cfg.lora.lora_learning_rate) == (128, True, 5e-4)
    assert cfg.ds.compute_fp32_loss and cfg.log.print_loss and cfg.log.enable_tensorboard
    # --offload_reference_model asks for DeepSpeed-Chat's reference, an (offloaded) frozen copy.
    assert cfg.reference_mode == "copy"
    defaults = parse_config(DPOConfig, ["--model_name_or_path", "m"])
    assert (defaults.dpo.beta, defaults.dpo.label_smoothing, defaults.train.learning_rate) == (0.1, 0.0, 1e-3)


def test_dpo_reference_mode():
    assert build_config(DPOConfig).reference_mode == "copy"
    assert build_config(DPOConfig, {"lora_dim": 4}).reference_mode == "copy"  # the base trains: no adapters-off
    assert build_config(DPOConfig, {"lora_dim": 4, "only_optimize_lora": True}).reference_mode == "adapters_off"
    assert build_config(DPOConfig, {"lora_dim": 4, "only_optimize_lora": True, "reference_model": "copy"}
                        ).reference_mode == "copy"
    assert build_config(DPOConfig, {"dpo_loss": "simpo"}).reference_mode == "none"
    # DeepSpeed-Chat's LoRA command line with --offload_reference_model: the offloaded copy it asks for.
    lora_offload = {"lora_dim": 4, "only_optimize_lora": True, "offload_reference_model": True, "zero_stage": 3}
    assert build_config(DPOConfig, lora_offload).reference_mode == "copy"
    assert build_config(DPOConfig, {"lora_dim": 4, "only_optimize_lora": True, "reference_quantization": "8bit"}
                        ).reference_mode == "copy"
