"""DPO's configuration: DeepSpeed-Chat's DPO command line parses with its meanings; the reference mode `auto`
resolves to."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from engine.config import DPOConfig
from engine.flags import build_config, parse_config
from engine.planner.plan import Hardware
from engine.planner.shapes import load_config
from engine.runtime.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[2]

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


def dpo_main():
    spec = importlib.util.spec_from_file_location("step2_dpo_main", ROOT / "step2_dpo" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_fit_plans_the_parsed_config_and_keeps_the_given_flags(monkeypatch, tmp_path, caplog):
    load_config("llama-2-7b").save_pretrained(tmp_path)  # the policy's folder, as the main hands it over
    monkeypatch.setattr("engine.planner.step3.this_machine", lambda world: Hardware(world, 80, 256))
    one_rank = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    flags = ["--auto_fit", "--max_seq_len", "512", "--per_device_train_batch_size", "4", "--dtype", "bf16"]
    parsed = parse_config(DPOConfig, flags)
    with caplog.at_level("INFO", logger="engine"):
        fitted = dpo_main().fit_to_machine(parsed, one_rank, str(tmp_path))
    # a full 7B policy and its copy do not fit one 80 GiB GPU: the planner changed something, and says what
    assert fitted != parsed and "--auto_fit chose" in caplog.text
    assert fitted.problems() == [] and fitted.given == parsed.given
    assert (fitted.data.max_seq_len, fitted.ds.dtype) == (512, "bf16")
    assert fitted.train.per_device_train_batch_size <= 4
    # --reference_model copy is kept: the plan never uses the policy without adapters as the reference
    copy = dpo_main().fit_to_machine(parse_config(DPOConfig, flags + ["--reference_model", "copy"]), one_rank,
                                     str(tmp_path))
    assert copy.reference_mode == "copy" and copy.problems() == []
