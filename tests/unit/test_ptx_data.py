"""PTX data (`engine/data/unsupervised.py`): documents joined with eos and cut into full blocks, the
local file formats `--unsupervised_dataset_name` accepts, and the errors for paths it cannot read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engine.config import Step3DataArgs
from engine.data.unsupervised import PTXDataset, collate_blocks, group_blocks, load_ptx_data, ptx_texts
from engine.errors import UserError
from engine.models.tiny import TOKENIZER_DIR
from engine.runtime.distributed import DistInfo

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def data_args(name: str, **kw) -> Step3DataArgs:
    return Step3DataArgs(unsupervised_dataset_name=name, **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# group_blocks
# ----------------------------------------------------------------------------------------------
def test_group_blocks_hand_worked():
    # [1, 2] + eos + [3] + eos = [1, 2, 0, 3, 0]: two blocks of 2, the last 0 dropped.
    blocks = group_blocks([[1, 2], [3]], eos_id=0, block_size=2)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[1, 2], [0, 3]]


def test_group_blocks_crosses_documents_and_drops_partial_block():
    # [5, 6, 7, 9, 8, 9, 9] with eos 9, blocks of 3: [5, 6, 7], [9, 8, 9], remainder [9] dropped.
    assert group_blocks([[5, 6, 7], [8], []], eos_id=9, block_size=3).tolist() == [[5, 6, 7], [9, 8, 9]]


def test_group_blocks_too_little_text_gives_no_block():
    blocks = group_blocks([[1, 2]], eos_id=0, block_size=4)  # 3 tokens < 4
    assert tuple(blocks.shape) == (0, 4)


# ----------------------------------------------------------------------------------------------
# ptx_texts: local sources
# ----------------------------------------------------------------------------------------------
def test_txt_one_document_per_non_blank_line(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \nsecond line\nthird\n")
    assert ptx_texts(data_args(str(path)), tokenizer) == ["first line", "second line", "third"]


def test_jsonl_text_field_and_step1_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "plain document"},
        {"text": "   "},                                              # blank text: skipped
        {"prompt": " Human: sort 3 1 Assistant:", "response": " 1 3"},  # step-1 row: prompt + response
        {"prompt": "Q:", "chosen": " good", "rejected": " bad"},        # pair row: prompt + chosen
    ])
    assert ptx_texts(data_args(str(path)), tokenizer) == [
        "plain document", " Human: sort 3 1 Assistant: 1 3", "Q: good"]


def test_json_list_with_text_field(tmp_path, tokenizer):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert ptx_texts(data_args(str(path)), tokenizer) == ["a", "b"]


def test_folder_with_train_txt(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("doc one\ndoc two\n")
    (tmp_path / "eval.txt").write_text("held out\n")
    assert ptx_texts(data_args(str(tmp_path)), tokenizer) == ["doc one", "doc two"]


def test_missing_local_path_is_a_user_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="nope.txt: no such file"):
        ptx_texts(data_args("./nope.txt"), tokenizer)
    with pytest.raises(UserError, match="no such file"):
        ptx_texts(data_args(str(tmp_path / "missing.jsonl")), tokenizer)


def test_unsupported_suffix_is_a_user_error(tmp_path, tokenizer):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(UserError, match="unsupported file type"):
        ptx_texts(data_args(str(path)), tokenizer)


def test_folder_without_train_file_is_a_user_error(tmp_path, tokenizer):
    (tmp_path / "eval.txt").write_text("held out\n")
    with pytest.raises(UserError, match="no train.txt"):
        ptx_texts(data_args(str(tmp_path)), tokenizer)


def test_row_without_text_or_answer_is_a_user_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no known field"}])
    with pytest.raises(UserError, match="bad.jsonl:2"):
        ptx_texts(data_args(str(path)), tokenizer)


# ----------------------------------------------------------------------------------------------
# Dataset and collation
# ----------------------------------------------------------------------------------------------
def test_collate_blocks():
    batch = collate_blocks([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, 6]]
    batch["labels"][0, 0] = -100  # labels are a copy: masking them leaves the inputs alone
    assert batch["input_ids"][0, 0] == 1


def test_load_ptx_data_blocks_the_tokenized_text(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"sort {i} {i + 3} {i + 1} please" for i in range(20)) + "\n")
    data = data_args(str(path), max_prompt_seq_len=4, max_answer_seq_len=4)
    dataset = load_ptx_data(data, tokenizer, tmp_path / "cache", DIST)
    ids = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in path.read_text().splitlines()]
    expected = group_blocks(ids, tokenizer.eos_token_id, 8)
    assert isinstance(dataset, PTXDataset) and len(dataset) == expected.shape[0] > 0
    assert torch.equal(torch.stack([dataset[i] for i in range(len(dataset))]), expected)
    assert (expected == tokenizer.eos_token_id).any()  # documents are separated by eos
    # A second load reads the cache and gives the same blocks.
    assert torch.equal(load_ptx_data(data, tokenizer, tmp_path / "cache", DIST).blocks, expected)


def test_load_ptx_data_too_little_text_is_a_user_error(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("hi\n")
    with pytest.raises(UserError, match="no full block"):
        load_ptx_data(data_args(str(path)), tokenizer, tmp_path / "cache", DIST)
