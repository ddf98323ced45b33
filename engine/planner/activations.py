"""Bytes of the transient tensors of each step-3 phase: KV cache, activations and logits, per rank.

Pure arithmetic on a `ModelShape`. The counts follow what autograd saves in a Hugging Face decoder
layer with SDPA attention (no T x T score matrix is kept: the fused kernels save q, k, v, the output
and a log-sum-exp), with b bytes per element of the model dtype, h the hidden size, kv the key width
(grouped-query models repeat keys and values to h before attention, so h is counted), I the MLP width:

- a norm saves its input and its normalised output: RMSNorm upcasts to fp32, so 4·h + b·h bytes per
  token (3·b·h in fp32, where the upcast is the input itself); LayerNorm b·h (plus two scalars);
- attention saves the norm's output, q, k, v, the attention output and the output projection's input:
  (4·h + 2·kv)·b;
- a gated MLP (Llama, Qwen) saves the norm's output and gate, activation, up and product: (h + 4·I)·b;
  a plain one (OPT) the norm's output, the first projection's and the activation's outputs: (h + 2·I)·b.

Gradient checkpointing (transformers', non-reentrant) keeps each layer's input (b·h per token) and
recomputes one layer at a time in the backward pass. Logits are V wide per token and dominate small
models unless chunked (--logprob_chunk_size): see `logits_bytes` for what step 3 keeps of them in each phase.
"""
from __future__ import annotations

from engine.planner.shapes import ModelShape
from engine.rl.chunked import resolve_chunk_size
from engine.runtime.ds_config import DTYPE_BYTES


def _norm_saved(shape: ModelShape, b: int) -> float:
    if shape.rms_norm:
        return (4 + b) * shape.hidden_size if b < 4 else 2 * b * shape.hidden_size
    return b * shape.hidden_size


def _attention_kv(shape: ModelShape) -> int:
    return shape.hidden_size if shape.kv_width < shape.hidden_size else shape.kv_width


def layer_saved_bytes(shape: ModelShape, dtype: str) -> float:
    """Bytes one decoder layer saves for the backward pass, per token (no checkpointing)."""
    b, h, i = DTYPE_BYTES[dtype], shape.hidden_size, shape.intermediate_size
    attention = (4 * h + 2 * _attention_kv(shape)) * b
    mlp = (h + (4 if shape.gated_mlp else 2) * i) * b
    return 2 * _norm_saved(shape, b) + attention + mlp


def layer_working_bytes(shape: ModelShape, dtype: str) -> float:
    """Bytes per token alive at once inside one layer's forward without autograd (or its backward):
    the residual stream and the layer input, and the MLP's widest moment (activation, up and product
    of a gated MLP; the first projection and its activation otherwise)."""
    b, h, i = DTYPE_BYTES[dtype], shape.hidden_size, shape.intermediate_size
    return (3 * h + (3 if shape.gated_mlp else 2) * i) * b


def training_activation_bytes(shape: ModelShape, dtype: str, batch: int, tokens: int,
                              gradient_checkpointing: bool) -> float:
    """Activations a trained role keeps through one micro-batch's forward and backward (logits apart)."""
    b = DTYPE_BYTES[dtype]
    per_token = (shape.num_layers * b * shape.hidden_size + layer_saved_bytes(shape, dtype) if gradient_checkpointing
                 else shape.num_layers * layer_saved_bytes(shape, dtype))
    # the final norm's saved tensors, and one layer's gradients in flight in the backward pass
    per_token += _norm_saved(shape, b) + b * shape.hidden_size + layer_working_bytes(shape, dtype)
    return per_token * batch * tokens


def inference_activation_bytes(shape: ModelShape, dtype: str, batch: int, tokens: int) -> float:
    """A no-grad forward over `tokens` tokens per sequence: one layer's working set at a time."""
    return layer_working_bytes(shape, dtype) * batch * tokens


def logits_bytes(shape: ModelShape, dtype: str, batch: int, tokens: int, phase: str,
                 chunk_size: int | None = 0) -> float:
    """Bytes of the vocabulary-wide tensors step 3 holds at its peak in `phase`.

    With chunked log-probs (`chunk_size` as --logprob_chunk_size: > 0, or None for automatic; 0 is off) the
    "score" and "train" terms below hold for one chunk of positions at a time, not for all `tokens`: the
    forward keeps only the hidden states, and the backward recomputes one chunk's logits at a time.

    - "score": experience making takes log-probs of the taken tokens: the logits (b), a contiguous fp32
      copy of the shifted logits (`.float()` of the slice, or log_softmax's own copy of it in fp32) and
      log_softmax's output, each B·T·V;
    - "train": the actor's PPO forward keeps the logits (b) and log_softmax's saved output (4), and the
      entropy it reports (under no_grad) needs a log_softmax, its exp and their product (4 + 4 + 4);
      the backward pass needs no more than that;
    - "generate": transformers computes the logits of the last position only: B·V in fp32, a few times.
    """
    b, v = DTYPE_BYTES[dtype], shape.vocab_size
    if chunk_size != 0 and phase != "generate":
        tokens = min(tokens, resolve_chunk_size(chunk_size, batch, v))
    if phase == "score":
        return batch * tokens * v * (b + 8)
    if phase == "train":
        return batch * tokens * v * (b + 16)
    if phase == "generate":
        return batch * v * 4 * 4
    raise ValueError(f"phase must be score, train or generate, not {phase!r}")


def kv_cache_bytes(shape: ModelShape, dtype: str, batch: int, tokens: int) -> float:
    """Keys and values of every layer for `tokens` positions of `batch` sequences."""
    return 2 * shape.num_layers * shape.kv_width * batch * tokens * DTYPE_BYTES[dtype]
