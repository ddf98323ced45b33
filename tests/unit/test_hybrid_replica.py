"""The hook-free replica (one process, no DeepSpeed): LoRA fused, same outputs, training weights untouched."""
from __future__ import annotations

import torch

from engine.config import LoRAArgs
from engine.models.hybrid import generation_mode, hook_free_replica
from engine.models.lora import apply_lora


def _lora_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=64, tie_word_embeddings=False))
    peft_model = apply_lora(model, LoRAArgs(lora_dim=4))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # non-zero adapters, so fusing matters
    return peft_model.eval()


def test_replica_is_plain_and_matches_the_peft_model():
    peft_model = _lora_llama()
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    replica = hook_free_replica(peft_model, may_modify=False)
    assert not any("lora" in n for n, _ in replica.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(replica(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in peft_model.state_dict().items())


class _Engine:
    def __init__(self, module):
        self.module = module


def test_generation_mode_restores_training_mode_and_generates():
    peft_model = _lora_llama().train()
    ids = torch.tensor([[5, 6, 7]])
    with generation_mode(_Engine(peft_model), zero_stage=0) as model:
        assert not model.training and not torch.is_grad_enabled()
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7) and peft_model.training and torch.is_grad_enabled()
    with torch.no_grad():
        greedy = peft_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy)


def test_replica_keeps_tied_embeddings_of_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                                     vocab_size=64, word_embed_proj_dim=32, max_position_embeddings=64)).eval()
    peft_model = apply_lora(model, LoRAArgs(lora_dim=4))
    replica = hook_free_replica(peft_model, may_modify=False)
    assert replica.lm_head.weight is replica.model.decoder.embed_tokens.weight
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(replica(input_ids=ids).logits, peft_model(input_ids=ids).logits)
