"""Step-2 pair tokenisation: what is kept, what is skipped and counted, and the batch layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engine.config import DataArgs
from engine.data.pairs import PairStats, collate_pairs, tokenize_pair, tokenize_pairs
from engine.data.rows import Row

TOKENIZER = Path(__file__).resolve().parents[2] / "engine" / "assets" / "tiny_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_pair_ends_with_eos_when_pad_differs(tok):
    c, r = tokenize_pair(Row(" Human: sort 2 1 Assistant:", " 1 2", " 2 1"), tok, tok.eos_token_id)
    prompt = tok(" Human: sort 2 1 Assistant:")["input_ids"]
    assert c == prompt + tok(" 1 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert r[:len(prompt)] == prompt and r[-1] == tok.eos_token_id and c != r


def test_no_end_token_when_it_is_the_pad_token(tok):
    # With pad == end token, Hugging Face's pooling would skip a trailing end token; so we do not add it.
    c, _ = tokenize_pair(Row(" Human: x Assistant:", " a", " b"), tok, tok.pad_token_id)
    assert c[-1] != tok.pad_token_id


def test_skips_are_counted(tok):
    rows = [Row(" Human: sort 2 1 Assistant:", " 1 2", " 2 1"),       # kept
            Row(" Human: sort 2 1 Assistant:", " 1 2", None),         # no rejected
            Row(" Human: sort 2 1 Assistant:", " 1 2", " 1 2"),       # identical
            Row(" Human: sort 2 1 Assistant:", " 1 2 9 9", " 1 2 9 8")]  # identical after truncation
    n_prompt = len(tok(" Human: sort 2 1 Assistant:")["input_ids"])
    stats = PairStats()
    # limit = prompt + 3: " 1 2" + eos fits exactly; " 1 2 9 9" + eos is cut to " 1 2 9" on both sides
    chosen, rejected = tokenize_pairs(rows, tok, DataArgs(max_seq_len=n_prompt + 3), tok.eos_token_id, stats)
    assert (stats.rows, stats.kept, stats.no_rejected, stats.identical, stats.truncated) == (4, 1, 1, 2, 1)
    assert len(chosen) == len(rejected) == 1


def test_overlength_drop(tok):
    rows = [Row(" Human: sort 2 1 Assistant:", " 1 2 3 4 5 6", " 2 1")]
    stats = PairStats()
    chosen, _ = tokenize_pairs(rows, tok, DataArgs(max_seq_len=8, overlength="drop"), tok.eos_token_id, stats)
    assert chosen == [] and stats.dropped_overlength == 1


def test_collate_puts_chosen_first_then_rejected():
    batch = [{"chosen": torch.tensor([1, 2, 3]), "rejected": torch.tensor([1, 4])},
             {"chosen": torch.tensor([5]), "rejected": torch.tensor([5, 6, 7, 8])}]
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [5, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_dpo_pairs_keep_the_end_token_even_when_it_is_the_pad_token_and_record_prompt_lengths(tok):
    # DPO: the policy must learn to stop, so the end token is always appended (the batch's attention mask, not the
    # id, marks it real); each kept pair records its prompt length (the prompt tokenized alone, as in step 1).
    rows = [Row(" Human: x Assistant:", " a", " b"), Row(" Human: y Assistant:", " c", None),
            Row(" Human: sort 3 1 Assistant:", " 1 3", " 3 1")]
    lengths: list[int] = []
    chosen, rejected = tokenize_pairs(rows, tok, DataArgs(), tok.pad_token_id, PairStats(), prompt_lengths=lengths)
    assert [c[-1] for c in chosen] == [tok.pad_token_id] * 2 and [r[-1] for r in rejected] == [tok.pad_token_id] * 2
    kept_prompts = (" Human: x Assistant:", " Human: sort 3 1 Assistant:")
    assert lengths == [len(tok(prompt)["input_ids"]) for prompt in kept_prompts]

