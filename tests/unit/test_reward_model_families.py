"""RewardModel reads the same score as each family's own *ForSequenceClassification pooling."""
from __future__ import annotations

import pytest
import torch

from engine.models.reward_model import RewardModel

SHAPE = dict(hidden_size=32, num_attention_heads=4, vocab_size=64, num_labels=1, pad_token_id=0)


def _model(family: str):
    from transformers import (
        AutoModelForSequenceClassification,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    configs = {
        "llama": LlamaConfig(intermediate_size=64, num_hidden_layers=1, **SHAPE),
        "opt": OPTConfig(ffn_dim=64, num_hidden_layers=1, word_embed_proj_dim=32, **SHAPE),
        "gpt_neox": GPTNeoXConfig(intermediate_size=64, num_hidden_layers=1, **SHAPE),
        "qwen2": Qwen2Config(intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2, **SHAPE),
        "mistral": MistralConfig(intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2, **SHAPE),
    }
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(configs[family]).eval()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "qwen2", "mistral"])
def test_scores_match_hf_pooling_on_right_padded_rows(family):
    model = _model(family)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])  # the second row is right-padded (pad id 0)
    mask = (ids != 0).long()
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = RewardModel(model).scores(ids, mask)
    torch.testing.assert_close(ours, hf.float(), rtol=0, atol=1e-6)


def test_a_causal_lm_is_not_a_reward_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.errors import UserError

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=64))
    with pytest.raises(UserError, match="value head"):
        RewardModel(lm)
