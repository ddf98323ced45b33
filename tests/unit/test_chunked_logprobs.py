"""Chunked log-probs, entropy and LM loss (--logprob_chunk_size) equal the full-logits path, values and
gradients, on a tiny model with a 32k vocabulary: step 1's loss, the PPO actor loss and experience log-probs,
plain, with tied embeddings and under peft LoRA."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.config import LoRAArgs
from engine.models.lm_head import lm_loss, token_logprobs
from engine.models.load import position_ids
from engine.models.lora import apply_lora
from engine.ppo.experience import sequence_logprobs
from engine.rl.chunked import AUTO_CHUNK_BYTES, chunked_logprobs, resolve_chunk_size
from engine.rl.lm_loss import IGNORE_INDEX
from engine.rl.ppo import logprobs_from_logits, policy_loss

VOCAB = 32768


def tiny_llama(tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied,
                                        pad_token_id=0))


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    seqs = torch.randint(2, VOCAB, (3, 19))
    mask = torch.ones_like(seqs)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return seqs.masked_fill(mask == 0, 0), mask


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module", params=["untied", "tied", "lora"])
def model(request):
    if request.param == "lora":
        return apply_lora(tiny_llama(tied=False), LoRAArgs(lora_dim=4, lora_module_name="layers.",
                                                           only_optimize_lora=True))
    return tiny_llama(tied=request.param == "tied")


def test_resolve_chunk_size():
    assert resolve_chunk_size(0, 8, VOCAB) == 0 and resolve_chunk_size(5, 8, VOCAB) == 5
    # 128 MiB / (4 bytes * 8 rows * 32768) = 128 positions; a huge batch still gets one.
    assert AUTO_CHUNK_BYTES == 128 * 2 ** 20 and resolve_chunk_size(None, 8, VOCAB) == 128
    assert resolve_chunk_size(None, 10 ** 6, VOCAB) == 1


def test_pure_chunked_logprobs_on_a_linear_head():
    torch.manual_seed(2)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    full = logprobs_from_logits(head(hidden), labels)
    full.sum().backward()
    want_h, want_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    lp, entropy = chunked_logprobs(hidden, head, labels, chunk_size=2)
    lp.sum().backward()
    torch.testing.assert_close(lp, full)
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(head.weight.grad, want_w)
    assert entropy is None


@pytest.mark.parametrize("chunk", [7, None])
def test_step1_loss_equal_to_full_logits(model, chunk):
    seqs, mask = left_padded_batch()
    labels = seqs.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX  # a prompt without loss
    batch = {"input_ids": seqs, "attention_mask": mask, "labels": labels}
    full, full_stats = lm_loss(model, batch, 0, fp32=True, token_count=40.0)
    full.backward()
    want = grads(model)
    loss, stats = lm_loss(model, batch, chunk, fp32=True, token_count=40.0)
    loss.backward()
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(stats["loss_sum"], full_stats["loss_sum"])
    assert int(stats["tokens"]) == int(full_stats["tokens"]) == 3 * 13  # targets 6..18 of each row
    assert_same_grads(want, grads(model))


def actor_loss(model, seqs, mask, action_mask, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs, entropy = token_logprobs(model, seqs, mask, position_ids(mask), chunk, with_entropy=True)
    old = logprobs.detach() + 0.1 * torch.linspace(-1, 1, logprobs.shape[1])
    advantages = torch.linspace(-2, 2, logprobs.numel()).reshape(logprobs.shape)
    pg, _ = policy_loss(logprobs, old, advantages, action_mask, cliprange=0.2)
    ent = (entropy * action_mask).sum() / action_mask.sum()
    return pg - 0.01 * ent, logprobs


@pytest.mark.parametrize("chunk", [5, None])
def test_ppo_actor_loss_equal_to_full_logits(model, chunk):
    seqs, mask = left_padded_batch()
    action_mask = torch.zeros(seqs.shape[0], seqs.shape[1] - 1)
    action_mask[:, 9:] = 1
    full, full_lp = actor_loss(model, seqs, mask, action_mask, 0)
    full.backward()
    want = grads(model)
    loss, lp = actor_loss(model, seqs, mask, action_mask, chunk)
    loss.backward()
    torch.testing.assert_close(lp, full_lp)
    torch.testing.assert_close(loss, full)
    assert_same_grads(want, grads(model))


def test_experience_logprobs_equal_to_full_logits(model):
    seqs, mask = left_padded_batch()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        full, logits = sequence_logprobs(reference, seqs, mask, 0)
        chunked, no_logits = sequence_logprobs(reference, seqs, mask, 4)
        auto, _ = sequence_logprobs(reference, seqs, mask, None)
    assert logits.shape == (3, 18, VOCAB) and no_logits is None
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(auto, full)


def test_a_head_trained_alone_still_gets_its_gradient():
    # hidden states that need no gradient (everything below the head frozen): no checkpoint, same gradient
    torch.manual_seed(3)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden, labels = torch.randn(2, 5, 6), torch.randint(0, 11, (2, 5))
    logprobs_from_logits(head(hidden), labels).sum().backward()
    want = head.weight.grad.clone()
    head.weight.grad = None
    chunked_logprobs(hidden, head, labels, chunk_size=3)[0].sum().backward()
    torch.testing.assert_close(head.weight.grad, want)
