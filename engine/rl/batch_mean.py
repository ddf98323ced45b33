"""A loss's mean over the whole global batch, however DeepSpeed splits it into micro-batches and ranks.

What DeepSpeed 0.19.8 does with the loss of each micro-batch (read in its source):
- `engine.backward(loss)` backpropagates `loss / gradient_accumulation_steps` (`scale_wrt_gas=True`, the
  default), and the gradients of the micro-batches of one window add up;
- the gradient reduction averages over the data-parallel ranks: ZeRO-0's `allreduce_bucket`, ZeRO-1/2's
  `average_tensor` (its all-reduce and its reduce-scatter paths) and ZeRO-3's `__avg_scatter_contiguous_grads`
  each divide by the data-parallel world size once, with the default `gradient_predivide_factor` of 1 that
  our configs keep (a factor only moves part of that division before the all-reduce).
So the update is the gradient of the mean, over the micro-batches of every rank, of the micro-batch losses.
DeepSpeed-Chat made each micro-batch loss that micro-batch's own mean, so a token (or pair) of a short
micro-batch weighed more than one of a long one, and batch 1 x accumulation 8 was not batch 8 x 1.

Here a micro-batch's loss is its *sum* divided by `mean_normaliser(...)`, the global count per micro-batch:
DeepSpeed's mean over M = micro-batches x ranks of (sum_i / (N / M)) is (sum over the global batch) / N,
the token mean of OpenRLHF and verl ("token-mean"), whatever the split.
"""
from __future__ import annotations


def mean_normaliser(global_count: float, micro_batches: int, world_size: int) -> float:
    """What to divide a micro-batch's summed loss by, so that DeepSpeed's mean over `micro_batches`
    micro-batches on each of `world_size` ranks is the global sum divided by `global_count`.

    global_count: the tokens (or pairs) the loss is taken over, in the whole window on all ranks. A window
    without any (count 0) has only zero sums; it gets a normaliser as for one token, so nothing divides by 0.
    """
    if micro_batches < 1 or world_size < 1:
        raise ValueError(f"micro_batches and world_size must be >= 1 (got {micro_batches}, {world_size})")
    return max(float(global_count), 1.0) / (micro_batches * world_size)
