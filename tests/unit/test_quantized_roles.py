"""Quantized frozen roles (--reference_quantization, --reward_quantization): how far their log-probs and scores
move from full precision, and the plain-module wrapper step 3 runs them in.

The built-in model (hidden 64) has too few weights per layer for bitsandbytes' blocks to behave as in a real
model, so the tolerances are measured on a random Llama of hidden 256 (2 layers, HF's default init, std 0.02),
in fp32 so that only the quantization differs. Random Gaussian weights are NF4's home ground but a random
network also amplifies errors more than a trained one; measure on your own model before relying on 4-bit.
"""
from __future__ import annotations

import pytest
import torch

from engine.config import ModelArgs
from engine.models.load import is_quantized, load_causal_lm, load_tokenizer
from engine.models.reward_model import load_reward_model
from engine.models.tiny import TOKENIZER_DIR
from engine.ppo.experience import sequence_logprobs

# Measured (fp32, 16 random sequences of 40-48 tokens), with bf16 against fp32 as a yardstick:
#   per-token log-prob |diff|: bf16 max 0.0075 mean 0.0019; 8-bit max 0.025 mean 0.0054; 4-bit max 0.25 mean 0.053
#   (summed over a sequence, as the k1 KL is: bf16 0.012, 8-bit 0.040, 4-bit 0.36 nats on average)
#   reward score mean |diff| over the scores' std: bf16 0.007; 8-bit 0.020; 4-bit 0.18 (correlation 0.976)
LOGPROB_MAX_ABS = {"8bit": 0.05, "4bit": 0.4}
LOGPROB_MEAN_ABS = {"8bit": 0.01, "4bit": 0.08}
SCORE_REL_ERROR = {"8bit": 0.05, "4bit": 0.3}


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """(causal-LM folder, reward-model folder) of a random hidden-256 Llama with the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = load_tokenizer(str(TOKENIZER_DIR), ModelArgs())
    shape = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    folders = []
    for name, cls, extra in (("lm", LlamaForCausalLM, {}), ("rm", LlamaForSequenceClassification, {"num_labels": 1})):
        folder = tmp_path_factory.mktemp(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            cls(LlamaConfig(**shape, **extra)).save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        folders.append(str(folder))
    return folders


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, vocab, (16, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, 40:] = 0  # every other row right-padded, as answers are
    return ids, mask


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_reference_logprobs_stay_close_to_full_precision(random_llama, quantization):
    path = random_llama[0]
    tok = load_tokenizer(path, ModelArgs())
    ids, mask = _batch(len(tok))
    with torch.no_grad():
        full, _ = sequence_logprobs(load_causal_lm(path, ModelArgs(), tok, "fp32", None, False).eval(), ids, mask)
        model = load_causal_lm(path, ModelArgs(), tok, "fp32", None, False, quantization).eval()
        quantized, _ = sequence_logprobs(model, ids, mask)
    assert is_quantized(model)
    diff = (quantized - full).abs()[mask[:, 1:].bool()]
    assert 0 < diff.max() < LOGPROB_MAX_ABS[quantization], diff.max()
    assert diff.mean() < LOGPROB_MEAN_ABS[quantization], diff.mean()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_reward_scores_stay_close_to_full_precision(random_llama, quantization):
    path = random_llama[1]
    tok = load_tokenizer(path, ModelArgs())
    ids, mask = _batch(len(tok))
    with torch.no_grad():
        full = load_reward_model(path, ModelArgs(), tok, "fp32", None, False).eval().scores(ids, mask)
        model = load_reward_model(path, ModelArgs(), tok, "fp32", None, False, quantization).eval()
        quantized = model.scores(ids, mask)
    head = model.model.score  # the value head stays a plain full-precision Linear
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and is_quantized(model)
    relative = (quantized - full).abs().mean() / full.std()
    assert 0 < relative < SCORE_REL_ERROR[quantization], relative


def test_a_quantized_frozen_role_is_a_plain_frozen_module(random_llama):
    from engine.models.roles import FrozenModule, init_frozen

    path = random_llama[0]
    tok = load_tokenizer(path, ModelArgs())
    model = load_causal_lm(path, ModelArgs(), tok, "bf16", None, False, "4bit")
    role = init_frozen(model.train(), None)  # no DeepSpeed config: ZeRO cannot partition it
    assert isinstance(role, FrozenModule) and role.module is model and role.optimizer is None
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids, mask = _batch(len(tok))
    with torch.no_grad():
        assert torch.equal(role(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_a_4bit_model_computes_the_same_numbers_in_every_mode_and_after_a_save(random_llama):
    """A QLoRA actor runs eval forwards (generation), train forwards and checkpoint saves in turn; a resumed
    run loads it afresh. All must compute the same numbers, and the gradient must reach the input through the
    4-bit layers. (On a CPU with AVX512-BF16, bitsandbytes' fused bf16 inference kernel broke all three until
    `use_dequantizing_4bit_matmul`; on other CPUs this holds either way.)"""
    path = random_llama[0]
    tok = load_tokenizer(path, ModelArgs())
    ids, mask = _batch(len(tok))

    def logits(model, train: bool) -> torch.Tensor:
        with torch.no_grad():
            return model.train(train)(input_ids=ids, attention_mask=mask).logits

    model = load_causal_lm(path, ModelArgs(), tok, "bf16", None, False, "4bit")
    first = logits(model, train=True)
    assert torch.equal(logits(model, train=False), first)  # eval and no grad: generation's forward
    assert torch.equal(logits(model, train=True), first)   # and train forwards after it
    model.state_dict()  # what a checkpoint save does
    assert torch.equal(logits(model, train=False), first)
    fresh = load_causal_lm(path, ModelArgs(), tok, "bf16", None, False, "4bit")
    assert torch.equal(logits(fresh, train=True), first)  # what a resumed run computes

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model.train()(inputs_embeds=embeds, attention_mask=mask).logits.float().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
