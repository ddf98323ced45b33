"""Step 1 on tiny random models of each family the product promises (Llama, OPT, GPT-NeoX, Qwen2,
Mistral), each with LoRA 'auto' and a different ZeRO stage: trains, saves a plain fused model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, train_losses

pytestmark = pytest.mark.smoke

TOKENIZER = ROOT / "engine" / "assets" / "tiny_tokenizer"
SHAPE = dict(hidden_size=32, num_attention_heads=4, vocab_size=288)


def _configs():
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    return {
        "llama": (LlamaConfig(intermediate_size=64, num_hidden_layers=2, **SHAPE), ["--zero_stage", "1"]),
        "opt": (OPTConfig(ffn_dim=64, num_hidden_layers=2, word_embed_proj_dim=32, max_position_embeddings=128,
                          **SHAPE), ["--zero_stage", "2", "--offload"]),
        "gpt_neox": (GPTNeoXConfig(intermediate_size=64, num_hidden_layers=2, **SHAPE),
                     ["--zero_stage", "3", "--attn_implementation", "eager"]),
        "qwen2": (Qwen2Config(intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2, **SHAPE),
                  ["--zero_stage", "0", "--gradient_checkpointing"]),
        "mistral": (MistralConfig(intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2, **SHAPE),
                    ["--zero_stage", "3", "--only_optimize_lora"]),
    }


def _make_folder(family: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _ = _configs()[family]
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "qwen2", "mistral"])
def test_family_trains_with_lora_and_saves_plain_model(family, run_step, tmp_path):
    from transformers import AutoModelForCausalLM

    base, out = tmp_path / "base", tmp_path / "out"
    _make_folder(family, base)
    run_step("step1_sft/main.py", ["--model_name_or_path", str(base), "--output_dir", str(out), "--lora_dim", "4",
                                   "--max_seq_len", "64", "--test_stop_step", "4", *_configs()[family][1]])
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    before, after = AutoModelForCausalLM.from_pretrained(str(base)), AutoModelForCausalLM.from_pretrained(str(out))
    assert type(before) is type(after)
    assert not any("lora" in k for k in after.state_dict())
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v.float(), before.state_dict()[k].float())]
    assert any("layers" in k or ".h." in k for k in changed)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(after(input_ids=ids).logits).all()
