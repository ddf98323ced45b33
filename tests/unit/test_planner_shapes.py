"""The planner's model shapes: shipped configs load, exact parameter counts match the published ones."""
from __future__ import annotations

import json

import pytest

from engine.errors import UserError
from engine.planner.shapes import ZOO_DIR, load_config, model_shape_of, shipped_models


def test_every_model_the_issue_names_is_shipped():
    assert {"llama-2-7b", "llama-2-13b", "llama-2-70b", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-66b",
            "qwen2.5-7b", "opt-350m"} <= set(shipped_models())


# Published sizes: the Llama-2 paper's model cards (6,738,415,616 for 7B), Qwen2.5-7B's card (7.61B),
# OPT-1.3B as counted by transformers on the released weights.
@pytest.mark.parametrize("name,params", [("llama-2-7b", 6_738_415_616), ("qwen2.5-7b", 7_615_616_512),
                                         ("opt-1.3b", 1_315_758_080)])
def test_parameter_counts_match_the_released_models(name, params):
    assert model_shape_of(load_config(name)).params == params


def test_shape_fields_of_llama_2_7b():
    s = model_shape_of(load_config("Llama-2-7B"))  # names are case-insensitive
    assert (s.num_layers, s.hidden_size, s.vocab_size, s.kv_width) == (32, 4096, 32000, 4096)
    assert s.largest_layer_params == 32000 * 4096  # the embedding (and the untied head) is the largest module
    # LoRA 'auto': q, k, v, o (4096 -> 4096) and gate, up (4096 -> 11008), down (11008 -> 4096) in 32 layers.
    per_layer = 4 * (4096 + 4096) + 3 * (4096 + 11008)
    assert s.lora_params(8) == 32 * 8 * per_layer and len(s.lora_targets) == 32 * 7


def test_trainable_parameters_with_lora_follow_the_engine():
    # Without --only_optimize_lora the adapted Linear weights stay frozen (engine.models.lora.apply_lora, as in
    # DeepSpeed-Chat): Llama-2-7B keeps its embeddings, norms and head trainable beside the adapters.
    s = model_shape_of(load_config("llama-2-7b"))
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert s.linear_params == linear
    assert s.trainable_params(8) == 6_738_415_616 - linear + s.lora_params(8)
    assert s.trainable_params(0) == s.params  # no LoRA: everything trains
    # ... and the count is the engine's, on the embedded tiny Llama.
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.config import LoRAArgs
    from engine.models.lora import apply_lora
    from engine.models.tiny import TINY_LLAMA, VOCAB_SIZE

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=VOCAB_SIZE))
    shape = model_shape_of(model.config)
    lora = apply_lora(model, LoRAArgs(lora_dim=4))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == shape.trainable_params(4)


def test_grouped_query_attention_narrows_the_kv_cache():
    assert model_shape_of(load_config("qwen2.5-7b")).kv_width == 4 * 128  # 4 kv heads of 128 of 28 heads


def test_reward_model_shape_adds_a_one_label_head():
    causal, reward = (model_shape_of(load_config("opt-350m"), sequence_classification=s) for s in (False, True))
    assert reward.params - causal.params == 512  # score: Linear(word_embed_proj_dim 512, 1), no bias


def test_a_local_config_folder_and_a_bad_name(tmp_path):
    data = json.loads((ZOO_DIR / "opt-350m.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert model_shape_of(load_config(str(tmp_path))).params == 331_196_416
    assert model_shape_of(load_config(str(tmp_path / "config.json"))).params == 331_196_416
    with pytest.raises(UserError, match="neither a shipped model config"):
        load_config("llama-9-1b")
