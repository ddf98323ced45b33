"""Run a causal LM to its last hidden states without its full logits, for the chunked log-probs of
`engine.rl.chunked`.

The model is called as usual (so DeepSpeed's engine, ZeRO-3's hooks, peft and the hybrid engine all see a
normal forward) with `logits_to_keep` set to no position, so the LM head projects nothing; a forward hook on
the decoder catches its last hidden state. The head is then called as a module chunk by chunk: under
ZeRO-3 its weight is partitioned and only the module's hooks gather it, and a tied head is the embedding.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from engine.errors import UserError
from engine.rl.chunked import chunked_causal_lm_loss, chunked_logprobs, resolve_chunk_size
from engine.rl.lm_loss import causal_lm_loss
from engine.rl.ppo import entropy_from_logits, logprobs_from_logits


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def can_skip_logits(model: Any) -> bool:
    """Whether `model` is a transformers causal LM that can return no logits and has a decoder to hook."""
    lm = causal_lm(model)
    return hasattr(lm, "get_decoder") and "logits_to_keep" in inspect.signature(lm.forward).parameters


def tied_head(model: Any) -> bool:
    """Whether the LM head's weight is the input embedding's (OPT, GPT-2, the tied small models)."""
    lm = causal_lm(model)
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    return head is not None and embedding is not None and getattr(head, "weight", None) is embedding.weight


def use_full_logits(model: Any, chunk_size: int | None) -> bool:
    """0 asks for the full logits; automatic (None) falls back to them for a model that cannot skip its
    logits (a non-transformers model), where an explicit size is refused (`hidden_and_head`), and for a head
    tied to the input embedding: the checkpointed chunks give that shared weight its gradient in a backward of
    their own, and ZeRO-1/2 then reduce it twice and stop (measured on OPT with LoRA, ZeRO-2 + offload)."""
    return chunk_size == 0 or (chunk_size is None and (not can_skip_logits(model) or tied_head(model)))


def hidden_and_head(model: Any, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    """(last hidden states (B, T, H), the LM head module) of `model` on `inputs`, no logits computed."""
    lm = causal_lm(model)
    if not can_skip_logits(model):
        raise UserError(f"{type(lm).__name__} cannot skip its logits (no logits_to_keep argument or decoder), which "
                        "chunked log-probs need; pass --logprob_chunk_size 0 to compute them from the full logits")
    caught: list[torch.Tensor] = []
    hook = lm.get_decoder().register_forward_hook(lambda _m, _i, out: caught.append(out[0]))
    try:
        no_position = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, logits_to_keep=no_position)
    finally:
        hook.remove()
    return caught[-1], lm.get_output_embeddings()


def vocab_size(model: Any) -> int:
    """Rows of the LM head's output (the logits' last dimension)."""
    return causal_lm(model).config.vocab_size


def token_logprobs(model: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   chunk_size: int | None, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (B, T-1) of each taken token, entropy (B, T-1) or None) of a causal LM on `sequences` (B, T).
    `chunk_size`: positions per chunk along the sequence, None for automatic, 0 for the full logits
    (`use_full_logits`)."""
    inputs = {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}
    if use_full_logits(model, chunk_size):
        logits = model(**inputs).logits[:, :-1]
        return logprobs_from_logits(logits, sequences[:, 1:]), entropy_from_logits(logits) if with_entropy else None
    hidden, head = hidden_and_head(model, **inputs)
    size = resolve_chunk_size(chunk_size, sequences.shape[0], vocab_size(model))
    return chunked_logprobs(hidden[:, :-1], head, sequences[:, 1:], size, with_entropy)


def lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int | None, fp32: bool,
            token_count: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`causal_lm_loss` of `model` on a labelled batch; `chunk_size` as in `token_logprobs`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if use_full_logits(model, chunk_size):
        return causal_lm_loss(model(**inputs).logits, batch["labels"], fp32=fp32, token_count=token_count)
    hidden, head = hidden_and_head(model, **inputs)
    size = resolve_chunk_size(chunk_size, batch["input_ids"].shape[0], vocab_size(model))
    return chunked_causal_lm_loss(hidden, head, batch["labels"], size, fp32=fp32, token_count=token_count)
