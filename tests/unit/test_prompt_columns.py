"""Step 3's prompt rows keep their other fields (columns) for the reward functions: --prompt_column_map,
prompt-only rows (GSM8K's schema in jsonl and parquet), the columns through the cache, aligned with the
prompts that fit, and per batch through `collate_prompt_rows`."""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from engine.config import DataArgs, Step3DataArgs, parse_column_map
from engine.data.cache import tensor_json
from engine.data.hub import load_hub_dataset
from engine.data.prompts import collate_left_padded, collate_prompt_rows, load_prompt_data
from engine.data.sources import record_to_prompt_row, rename_fields
from engine.errors import UserError
from engine.runtime.distributed import DistInfo
from engine.runtime.run import make_loader

TOKENIZER = Path(__file__).resolve().parents[2] / "engine" / "assets" / "tiny_tokenizer"
DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# GSM8K's schema: question, answer ("reasoning #### number"); the third question is far longer than the others
GSM8K = [
    {"question": "How many apples? 3 + 4", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "How many pears? 2 + 2", "answer": "2 + 2 = 4\n#### 4"},
    {"question": "Natalia sold clips to 48 of her friends in April, and half as many in May. How many clips?",
     "answer": "48 + 24 = 72\n#### 72"},
    {"question": "How many plums? 5 - 1", "answer": "5 - 1 = 4\n#### 4"},
]
STEP3_ONLY = "0,0,1"  # the whole file is step 3's


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------
# The column map
# ----------------------------------------------------------------------------------------------
def test_parse_column_map():
    assert parse_column_map("") == {}
    assert parse_column_map(" question=prompt , answer=ground_truth") == {"question": "prompt",
                                                                         "answer": "ground_truth"}
    for text, message in [("question", "'question' is not field=name"), ("a=", "'a=' is not field=name"),
                          ("a=x,a=y", "field 'a' is mapped twice"), ("a=x,b=x", "several fields are mapped to x")]:
        with pytest.raises(UserError, match=message):
            parse_column_map(text)


def test_a_bad_column_map_is_a_problem_of_the_step_3_data_flags():
    assert Step3DataArgs().problems() == []
    (problem,) = Step3DataArgs(prompt_column_map="question").problems()
    assert problem.startswith("--prompt_column_map 'question':")


def test_rename_fields_all_at_once():
    assert rename_fields({"question": "q", "answer": "a"}, {"question": "prompt"}, "f:1") == {"prompt": "q",
                                                                                            "answer": "a"}
    assert rename_fields({"a": 1, "b": 2}, {"a": "b", "b": "a"}, "f:1") == {"b": 1, "a": 2}  # a swap
    with pytest.raises(UserError, match="f:1: --prompt_column_map renames 'question' to 'prompt', but the row "
                                        "has a 'prompt' field too"):
        rename_fields({"question": "q", "prompt": "p"}, {"question": "prompt"}, "f:1")


def test_prompt_rows_keep_their_other_fields(tok):
    row = record_to_prompt_row({"prompt": " Human: hi Assistant:", "answer": "#### 3", "level": 2}, tok, "f:1")
    assert (row.prompt, row.chosen, row.columns) == (" Human: hi Assistant:", "", {"answer": "#### 3", "level": 2})
    # a row with answers is read (and checked) as steps 1 and 2 read it; its answers become columns
    row = record_to_prompt_row({"prompt": "p", "chosen": " c", "rejected": " r"}, tok, "f:1")
    assert (row.chosen, row.columns) == (" c", {"chosen": " c", "rejected": " r"})
    with pytest.raises(UserError, match="missing field 'prompt' \\(fields: question, answer\\); .* "
                                        "--prompt_column_map, e.g. question=prompt"):
        record_to_prompt_row(GSM8K[0], tok, "f:1")


# ----------------------------------------------------------------------------------------------
# Through the cache, aligned with the prompts that fit
# ----------------------------------------------------------------------------------------------
def test_gsm8k_jsonl_columns_follow_the_prompts_that_fit(tok, tmp_path):
    data = DataArgs(data_path=[str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K * 5))], data_split=STEP3_ONLY)
    # the short questions are 18 tokens or fewer, the long one more: 30 drops it
    train, evals = load_prompt_data(data, tok, 30, tmp_path / "cache", 1, DIST, column_map={"question": "prompt"})
    rows = [d.row(i) for d in (train, evals) for i in range(len(d))]
    assert len(rows) == 15 and len(train) + len(evals) == 15  # 5 of 20 dropped for length
    answers = {r["question"]: r["answer"] for r in GSM8K}
    for r in rows:
        assert tok.decode(r.input_ids) == r.prompt  # the text is the tokenized prompt's own
        assert r.columns == {"answer": answers[r.prompt]}  # and the answer is its row's
    assert "Natalia" not in " ".join(r.prompt for r in rows)

    # the step-3 loader over the rows' view gives the same batches as over the ids, plus texts and columns
    plain = make_loader(train, 4, DIST, True, 1, partial(collate_left_padded, pad_id=0, width=30))
    with_rows = make_loader(train.rows(), 4, DIST, True, 1, partial(collate_prompt_rows, pad_id=0, width=30))
    for a, b in zip(plain, with_rows, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert b["prompts"] == tok.batch_decode(b["input_ids"], skip_special_tokens=True)
        assert b["columns"] == {"answer": [answers[p] for p in b["prompts"]]}


def test_gsm8k_parquet_folder_with_a_test_split(tok, tmp_path, caplog):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for name, records in (("train", GSM8K[:2] * 3), ("test", GSM8K[3:] * 2)):
        table = pa.table({"question": [r["question"] for r in records], "answer": [r["answer"] for r in records],
                          "id": list(range(len(records))), "raw": [b"\x00"] * len(records)})
        pq.write_table(table, folder / f"{name}.parquet")
    data = DataArgs(data_path=[str(folder)], data_split=STEP3_ONLY)
    with caplog.at_level(logging.WARNING, logger="engine"):
        train, evals = load_prompt_data(data, tok, 30, tmp_path / "cache", 1, DIST, column_map={"question": "prompt"})
    # bytes cannot be stored as JSON: that column is left out, and said so
    assert "left out the field(s) raw" in caplog.text
    assert set(train.columns) == {"answer", "id"} and train.columns["id"] == list(range(6))
    assert evals.prompts == [GSM8K[3]["question"]] * 2 and evals.columns["answer"] == [GSM8K[3]["answer"]] * 2


def test_texts_and_columns_live_in_the_one_cache_file_and_are_reused(tok, tmp_path):
    data = DataArgs(data_path=[str(write_jsonl(tmp_path / "g.jsonl", GSM8K[:2] * 5))], data_split=STEP3_ONLY)
    cache = tmp_path / "cache"
    first = load_prompt_data(data, tok, 30, cache, 1, DIST, column_map={"question": "prompt"})[0]
    (path,) = cache.iterdir()  # one file: the tokens and, as JSON in a uint8 tensor, the texts and columns
    stored = tensor_json(load_file(str(path))["train/rows_json"])
    assert stored == {"prompts": first.prompts, "columns": first.columns}
    stamp = path.stat().st_mtime_ns
    again = load_prompt_data(data, tok, 30, cache, 1, DIST, column_map={"question": "prompt"})[0]
    assert path.stat().st_mtime_ns == stamp and again.columns == first.columns  # reused, not rebuilt
    # another column map is another cache entry
    load_prompt_data(data, tok, 30, cache, 1, DIST, column_map={"question": "prompt", "answer": "ground_truth"})
    assert len(list(cache.iterdir())) == 2


def test_a_column_named_like_a_reward_argument_is_refused(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p q", "completions": "x"}] * 10)
    with pytest.raises(UserError, match="field named 'completions'.*--prompt_column_map completions=<another name>"):
        load_prompt_data(DataArgs(data_path=[str(path)], data_split=STEP3_ONLY), tok, 30, tmp_path, 1, DIST)


def test_the_bundled_task_carries_its_answers(tok, tmp_path):
    train, _ = load_prompt_data(DataArgs(), tok, 16, tmp_path, 1234, DIST)
    assert set(train.columns) == {"chosen", "rejected"} and len(train.columns["chosen"]) == len(train) == 1600
    assert tok.decode(train[0]) == train.prompts[0]


# ----------------------------------------------------------------------------------------------
# Hub sets
# ----------------------------------------------------------------------------------------------
def test_hub_rows_keep_their_scalar_fields():
    raw = {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " r", "chosen": " c", "rejected": " x",
           "meta": {"nested": [1, 2]}, "score": 3}
    train, _ = load_hub_dataset("Dahoas/rm-static", 1, lambda *a: {"train": [raw], "test": [raw]}, keep_columns=True)
    assert train[0].columns == {"response": " r", "chosen": " c", "rejected": " x", "score": 3}
    plain, _ = load_hub_dataset("Dahoas/rm-static", 1, lambda *a: {"train": [raw], "test": [raw]})
    assert plain[0].columns == {}
