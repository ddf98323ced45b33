"""Step-3 prompt data: drop (and count) over-long prompts, left-pad to a fixed width, cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engine.config import DataArgs
from engine.data.prompts import collate_left_padded, load_prompt_data, tokenize_prompts
from engine.errors import UserError
from engine.runtime.distributed import DistInfo

TOKENIZER = Path(__file__).resolve().parents[2] / "engine" / "assets" / "tiny_tokenizer"
DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_long_prompts_are_dropped_and_counted(tok):
    # " Human: sort 2 1 Assistant:" is 7 tokens; one more digit makes 8
    kept, dropped = tokenize_prompts([" Human: sort 2 1 Assistant:", " Human: sort 2 1 3 Assistant:"], tok, 7)
    assert [len(k) for k in kept] == [7] and dropped == 1


def test_left_padding_to_a_fixed_width():
    out = collate_left_padded([torch.tensor([5, 6]), torch.tensor([7])], pad_id=0, width=4)
    assert out["input_ids"].tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_bundled_prompts_of_step_3(tok, tmp_path):
    train, evals = load_prompt_data(DataArgs(), tok, 16, tmp_path, 1234, DIST)
    # 40% of the 4000 bundled train rows and of the 400 eval rows; every sorting prompt fits 16 tokens
    assert (len(train), len(evals)) == (1600, 160)
    assert all(len(train[i]) <= 16 for i in range(len(train)))
    assert tok.decode(train[0]).startswith(" Human: sort ")


def test_nothing_fits_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError, match="fits --max_prompt_seq_len 3"):
        load_prompt_data(DataArgs(), tok, 3, tmp_path, 1234, DIST)
