"""DPO's reference held three ways (a frozen copy, the LoRA policy with adapters off, precomputed log-probs)
gives the same log-probs and the same loss on the same batch; and the DPO pair data's conventions."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.config import DPOArgs, LoRAArgs
from engine.data.cache import pack_sequences
from engine.data.pairs import DPOPairDataset, collate_dpo_pairs
from engine.dpo.logps import pair_logps
from engine.dpo.reference import Reference, precompute
from engine.dpo.trainer import batch_loss
from engine.models.lora import apply_lora
from engine.runtime.distributed import DistInfo
from tests.conftest import tiny_model_folder

PAD = 0
# Five pairs over a vocabulary the tiny model has: (prompt, chosen answer, rejected answer) ids; the end token
# (id 2) closes every answer. Answers of different lengths, so batches are padded differently.
PAIRS = [([5, 6, 7], [8, 9, 2], [9, 2]), ([5, 10], [11, 12, 13, 2], [13, 2]), ([5, 6, 14, 15], [16, 2], [17, 18, 2]),
         ([5, 19], [20, 21, 2], [21, 20, 2]), ([5, 22, 23], [24, 2], [25, 26, 27, 28, 2])]


class EngineLike(torch.nn.Module):
    """What the reference uses of a DeepSpeed engine: `.module`, calls, and train/eval passed on to the module
    without setting its own `training` (as DeepSpeed 0.19.8's engine does)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self


@pytest.fixture(scope="module")
def models(engine_cache):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_folder(engine_cache)), torch_dtype=torch.float32).eval()
    torch.manual_seed(0)  # lora_A's initialisation
    policy = apply_lora(copy.deepcopy(base), LoRAArgs(lora_dim=4, only_optimize_lora=True))
    with torch.no_grad():  # trained-looking adapters: the policy differs from the reference
        gen = torch.Generator().manual_seed(0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 5.0)
    return base, EngineLike(policy.train())


def dataset() -> DPOPairDataset:
    tensors = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        tensors |= {f"{side}_{key}": v for key, v in pack_sequences([p[0] + p[k] for p in PAIRS]).items()}
    return DPOPairDataset(tensors | {"prompt_lengths": torch.tensor([len(p[0]) for p in PAIRS])})


def test_dpo_batch_rows_prompt_lengths_and_index():
    batch = collate_dpo_pairs([dataset()[i] for i in (3, 1)], pad_id=PAD)
    # Rows: chosen of pairs 3 and 1, then their rejected; width 6 (pair 1's chosen: 2 + 4 tokens).
    assert batch["input_ids"][0].tolist() == [5, 19, 20, 21, 2, PAD]
    assert batch["input_ids"][3].tolist() == [5, 10, 13, 2, PAD, PAD]
    assert batch["prompt_lengths"].tolist() == [2, 2, 2, 2] and batch["index"].tolist() == [3, 1]


def test_three_reference_modes_give_the_same_loss(models):
    base, engine = models
    data = dataset()
    batch = collate_dpo_pairs([data[i] for i in (4, 0, 2, 1)], pad_id=PAD)
    copy_ref = Reference("copy", 0, model=base)
    off_ref = Reference("adapters_off", 0, policy=engine)
    # Precomputed in batches of 2 (other padding than the training batch), in the natural row order.
    cached = precompute(off_ref, {"train": data}, batch_size=2, pad_id=PAD, dist=DistInfo(0, 0, 1, torch.device("cpu")))
    pre_ref = Reference("precomputed", 0, cached=cached)
    assert engine.module.training  # adapters_off restored the training mode

    policy = pair_logps(engine, batch, 0)
    losses = {}
    for name, reference in (("copy", copy_ref), ("adapters_off", off_ref), ("precomputed", pre_ref)):
        logps = reference.logps(batch, "train")
        torch.testing.assert_close(logps.chosen, copy_ref.logps(batch, "train").chosen)
        torch.testing.assert_close(logps.rejected, copy_ref.logps(batch, "train").rejected)
        losses[name] = batch_loss(policy, logps, DPOArgs())[0]
    torch.testing.assert_close(losses["adapters_off"], losses["copy"])
    torch.testing.assert_close(losses["precomputed"], losses["copy"])
    # The adapters matter: the policy is not its reference (so the agreement above is not that of equal models).
    assert float((policy.chosen.detach() - copy_ref.logps(batch, "train").chosen).abs().min()) > 0.1


def test_policy_without_training_is_its_reference(models):
    base, _ = models
    batch = collate_dpo_pairs([dataset()[i] for i in range(5)], pad_id=PAD)
    ref = Reference("copy", 0, model=base)
    with torch.no_grad():
        loss, stats = batch_loss(pair_logps(base, batch, 0), ref.logps(batch, "train"), DPOArgs())
    assert float(loss) == pytest.approx(math.log(2)) and float(stats["margins"].abs().max()) == 0.0


def test_answer_log_probs_count_the_answer_and_end_token_only(models):
    base, _ = models
    batch = collate_dpo_pairs([dataset()[0]], pad_id=PAD)
    logps = pair_logps(base, batch, 0)
    # Chosen [5, 6, 7 | 8, 9, 2]: the answer is 8, 9 and the end token 2, read at actions 2, 3, 4.
    with torch.no_grad():
        full = torch.log_softmax(base(batch["input_ids"][:1]).logits[0].float(), -1)
    expected = full[2, 8] + full[3, 9] + full[4, 2]
    torch.testing.assert_close(logps.chosen, expected.reshape(1))
    assert logps.chosen_counts.tolist() == [3.0] and logps.rejected_counts.tolist() == [2.0]
