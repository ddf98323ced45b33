"""Step-1 data: row schemas and file errors (sources), --data_split slices (split), tokenisation,
labels, padding and the safetensors cache (sft), and the bundled sorting task (synthetic).

Token ids below were read off the shipped tiny tokenizer (engine/assets/tiny_tokenizer/tokenizer.json,
a byte-level BPE): " Human"=282, ":"=27, " sort"=283, " Assistant"=284, " 1"=259, " 2"=261,
" 3"=264, " 4"=263, "<pad>"=0, "<|endoftext|>"=1 (the eos token).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import engine.data.sft as sft
from engine.config import DataArgs, Step1DataArgs, parse_data_split
from engine.data.cache import cache_key, pack_sequences
from engine.data.rows import Row
from engine.data.sft import (
    SFTDataset,
    TokenizeStats,
    collate_right_padded,
    load_sft_data,
    tokenize_rows,
    tokenize_sft_row,
)
from engine.data.sort_task import ASSET_DIR, is_correct, write_bundle
from engine.data.sources import carve_eval, load_folder, load_source, read_rows, record_to_row
from engine.data.split import phase_rows, phase_slice
from engine.errors import UserError
from engine.rl.lm_loss import IGNORE_INDEX
from engine.runtime.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "engine" / "assets" / "tiny_tokenizer"
EOS = 1
HUMAN, COLON, SORT, ASSISTANT = 282, 27, 283, 284
T1, T2, T3, T4 = 259, 261, 264, 263


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sort_rows(n: int, tag: str = "") -> list[dict]:
    """n distinct rows; `tag` keeps rows of different files apart."""
    return [{"prompt": f" Human: sort {i} {tag}Assistant:", "chosen": f" {i}"} for i in range(n)]


# ----------------------------------------------------------------------------------------------
# record_to_row: the three schemas
# ----------------------------------------------------------------------------------------------
def test_prompt_chosen_rejected(tok):
    row = record_to_row({"prompt": " Human: sort 3 1 Assistant:", "chosen": " 1 3", "rejected": " 3 1"},
                        tok, "x")
    assert row == Row(" Human: sort 3 1 Assistant:", " 1 3", " 3 1")


def test_prompt_chosen_without_rejected(tok):
    assert record_to_row({"prompt": "p", "chosen": " a"}, tok, "x") == Row("p", " a", None)
    assert record_to_row({"prompt": "p", "chosen": " a", "rejected": None}, tok, "x") == Row("p", " a", None)


def test_prompt_response(tok):
    assert record_to_row({"prompt": "p", "response": " a"}, tok, "x") == Row("p", " a")


def test_messages_without_chat_template_use_human_assistant_form(tok):
    assert getattr(tok, "chat_template", None) is None  # the tiny tokenizer has none
    row = record_to_row({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "sort 3 1"},
        {"role": "assistant", "content": "1 3"},
    ]}, tok, "x")
    assert row == Row(" Be brief. Human: sort 3 1 Assistant:", " 1 3")


def test_multi_turn_messages_without_chat_template(tok):
    row = record_to_row({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "sort 2 1"},
        {"role": "assistant", "content": "1 2"},
    ]}, tok, "x")
    assert row == Row(" Human: hi Assistant: hello Human: sort 2 1 Assistant:", " 1 2")


class FakeChatTokenizer:
    """A tokenizer with a chat template: <|role|>content<|end|> per message."""

    chat_template = "{{ fake }}"

    def __init__(self, prefix_stable: bool = True):
        self.prefix_stable = prefix_stable
        self.calls: list[tuple[int, bool]] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        self.calls.append((len(messages), add_generation_prompt))
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        if add_generation_prompt:
            return text + "<|assistant|>"
        # A template that renders the history differently once an answer follows (e.g. drops a
        # system default) is not a prefix of the full chat.
        return text if self.prefix_stable else "[full]" + text


def test_messages_with_chat_template():
    fake = FakeChatTokenizer()
    row = record_to_row({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]}, fake, "x")
    # prompt = render(history, generation prompt) = "<|user|>q<|end|><|assistant|>"
    # full   = "<|user|>q<|end|><|assistant|>a<|end|>"  -> answer = full minus the prompt
    assert row == Row("<|user|>q<|end|><|assistant|>", "a<|end|>")
    assert fake.calls == [(1, True), (2, False)]


def test_messages_with_chat_template_that_is_not_a_prefix():
    row = record_to_row({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]},
                        FakeChatTokenizer(prefix_stable=False), "x")
    assert row == Row("<|user|>q<|end|><|assistant|>", "a")  # the answer's content, as is


@pytest.mark.parametrize("record, message", [
    ({"messages": "hi"}, "list of at least two"),
    ({"messages": [{"role": "user", "content": "q"}]}, "list of at least two"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "last message must be a non-empty assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "last message must be a non-empty assistant"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "unknown role 'robot'"),
    ({"prompt": "p"}, "no answer field"),
    ({"chosen": " a"}, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": 3}, "field 'chosen' must be a string"),
    ({"prompt": "   ", "chosen": " a"}, "field 'prompt' is empty"),
    ({"prompt": "p", "response": "\n\t"}, "field 'response' is empty"),
    (["p", "a"], "must be a JSON object"),
])
def test_bad_records_are_user_errors_with_where(tok, record, message):
    with pytest.raises(UserError) as exc:
        record_to_row(record, tok, "data.jsonl:7")
    assert str(exc.value).startswith("data.jsonl:7: ")
    assert message in str(exc.value)


# ----------------------------------------------------------------------------------------------
# Files: errors name the file and the line
# ----------------------------------------------------------------------------------------------
GOOD = '{"prompt": " Human: sort 2 1 Assistant:", "chosen": " 1 2"}\n'


def test_malformed_jsonl_line_3(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + GOOD + '{"prompt": "p", "chosen": \n' + GOOD)
    with pytest.raises(UserError, match=rf"^{path}:3: malformed JSON"):
        read_rows(path, tok)


def test_blank_lines_are_skipped_but_counted(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + '{"prompt": "p"}\n')  # the bad row is on line 3
    with pytest.raises(UserError, match=rf"^{path}:3: no answer field"):
        read_rows(path, tok)


def test_missing_field_names_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + '{"chosen": " 1 2"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: missing field 'prompt'"):
        read_rows(path, tok)


def test_empty_field_names_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + GOOD + '{"prompt": " ", "chosen": " 1 2"}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: field 'prompt' is empty"):
        read_rows(path, tok)


def test_non_utf8_bytes_are_a_user_error(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b'{"prompt": "caf\xe9", "chosen": " a"}\n')  # latin-1 e-acute
    with pytest.raises(UserError, match=rf"^{path}:2: not UTF-8"):
        read_rows(path, tok)


def test_non_utf8_error_gives_the_true_position(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    # 200 good lines, then the bad byte on line 201 after '{"prompt": "caf' (15 bytes).
    path.write_bytes(GOOD.encode() * 200 + b'{"prompt": "caf\xe9", "chosen": " a"}\n')
    offset = len(GOOD.encode()) * 200 + 15
    with pytest.raises(UserError) as exc:
        read_rows(path, tok)
    assert f"byte {offset}" in str(exc.value) or f"{path}:201" in str(exc.value)


def test_json_file_must_be_a_list(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "p", "chosen": " a"}')
    with pytest.raises(UserError, match=rf"^{path}: a \.json dataset must be a list"):
        read_rows(path, tok)


def test_json_list_rows_are_indexed(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": " a"}, {"prompt": "p"}]))
    with pytest.raises(UserError, match=rf"^{path}\[1\]: no answer field"):
        read_rows(path, tok)


def test_malformed_json_names_the_line(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "p", "chosen": " a"},\n{"prompt": \n]')
    with pytest.raises(UserError, match=rf"^{path}:4: malformed JSON"):
        read_rows(path, tok)


def test_empty_file_is_a_user_error(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="holds no rows"):
        read_rows(path, tok)


def test_parquet_file(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": " Human: sort 2 1 Assistant:", "chosen": " 1 2", "rejected": " 2 1"},
        {"prompt": " Human: sort 9 8 Assistant:", "chosen": " 8 9", "rejected": None},
    ]), path)
    assert read_rows(path, tok) == [Row(" Human: sort 2 1 Assistant:", " 1 2", " 2 1"),
                                    Row(" Human: sort 9 8 Assistant:", " 8 9", None)]


def test_damaged_parquet_is_a_user_error(tmp_path, tok):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read it as parquet"):
        read_rows(path, tok)


# ----------------------------------------------------------------------------------------------
# Folders and sources
# ----------------------------------------------------------------------------------------------
def test_folder_with_train_and_eval(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", sort_rows(3, "t "))
    write_jsonl(tmp_path / "eval.jsonl", sort_rows(2, "e "))
    train, evals = load_source(str(tmp_path), tok, seed=1)
    assert [r.prompt for r in train] == [" Human: sort 0 t Assistant:", " Human: sort 1 t Assistant:",
                                         " Human: sort 2 t Assistant:"]
    assert [r.prompt for r in evals] == [" Human: sort 0 e Assistant:", " Human: sort 1 e Assistant:"]


def test_folder_with_train_only_carves_a_seeded_eval(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", sort_rows(20))
    train, evals = load_folder(tmp_path, tok, seed=5)
    # 10% of 20 rows = 2 held out, 18 kept; every row in exactly one part
    assert (len(train), len(evals)) == (18, 2)
    assert set(train).isdisjoint(evals)
    assert set(train) | set(evals) == set(read_rows(tmp_path / "train.jsonl", tok))
    assert load_folder(tmp_path, tok, seed=5) == (train, evals)  # deterministic
    other = [load_folder(tmp_path, tok, seed=s)[1] for s in range(6, 12)]
    assert any(ev != evals for ev in other)  # and it is the seed that picks them


def test_carve_eval_sizes():
    rows = [Row(f"p{i}", " a") for i in range(25)]
    # int(25 * 0.1) = 2; a single row is never split; two rows give one each
    assert [len(x) for x in carve_eval(rows, 0)] == [23, 2]
    assert [len(x) for x in carve_eval(rows[:1], 0)] == [1, 0]
    assert [len(x) for x in carve_eval(rows[:2], 0)] == [1, 1]


def test_folder_without_train_file(tmp_path, tok):
    write_jsonl(tmp_path / "eval.jsonl", sort_rows(2))
    with pytest.raises(UserError, match="no train.jsonl"):
        load_source(str(tmp_path), tok, seed=1)


def test_unknown_dataset_name_is_a_user_error(tok):
    with pytest.raises(UserError, match="acme/no-such-dataset"):
        load_source("acme/no-such-dataset", tok, seed=1)


def test_missing_local_file_says_so(tmp_path, tok):
    spec = str(tmp_path / "typo.jsonl")
    with pytest.raises(UserError, match="the file does not exist") as exc:
        load_source(spec, tok, seed=1)
    assert spec in str(exc.value)


def test_unsupported_suffix(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen\n")
    with pytest.raises(UserError, match="unsupported file type"):
        load_source(str(path), tok, seed=1)


# ----------------------------------------------------------------------------------------------
# --data_split
# ----------------------------------------------------------------------------------------------
W244 = [0.2, 0.4, 0.4]


def test_phase_slice_sizes_for_10_rows():
    # cumulative 0, .2, .6, 1.0 times 10 -> cuts 0, 2, 6, 10 -> sizes 2, 4, 4
    assert [len(phase_slice(10, W244, p, seed=3)) for p in (1, 2, 3)] == [2, 4, 4]


def test_phase_slice_sizes_for_7_rows():
    # cuts round(1.4)=1, round(4.2)=4, 7 -> sizes 1, 3, 3
    assert [len(phase_slice(7, W244, p, seed=3)) for p in (1, 2, 3)] == [1, 3, 3]


@pytest.mark.parametrize("n", [1, 10, 37])
def test_phase_slices_are_disjoint_and_cover_all(n):
    parts = [set(phase_slice(n, W244, p, seed=11)) for p in (1, 2, 3)]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    assert parts[0] | parts[1] | parts[2] == set(range(n))


def test_phase_slice_is_deterministic_and_seeded():
    assert phase_slice(100, W244, 2, seed=1) == phase_slice(100, W244, 2, seed=1)
    assert phase_slice(100, W244, 2, seed=1) != phase_slice(100, W244, 2, seed=2)


def test_phase_slice_with_zero_weight():
    assert phase_slice(10, [1.0, 0.0, 0.0], 1, seed=0) == list(range(10))
    assert phase_slice(10, [1.0, 0.0, 0.0], 2, seed=0) == []


def test_phase_slice_refuses_phase_4():
    with pytest.raises(ValueError):
        phase_slice(10, W244, 4, seed=0)


def test_phase_rows_default_is_the_bundled_task(tok):
    train, evals = phase_rows(DataArgs(), tok, phase=1, seed=1234)
    # bundled: 4000 train, 400 eval rows; step 1 gets 20% -> 800 and 80
    assert (len(train), len(evals)) == (800, 80)
    assert all(r.prompt.startswith(" Human: sort ") for r in train)


def test_sft_only_data_is_used_whole_in_phase_1_only(tmp_path, tok):
    main, extra = tmp_path / "main", tmp_path / "extra"
    main.mkdir(), extra.mkdir()
    write_jsonl(main / "train.jsonl", sort_rows(10, "m "))
    write_jsonl(main / "eval.jsonl", sort_rows(10, "me "))
    write_jsonl(extra / "train.jsonl", sort_rows(3, "x "))
    write_jsonl(extra / "eval.jsonl", sort_rows(1, "xe "))
    data = Step1DataArgs(data_path=[str(main)], sft_only_data_path=[str(extra)], data_split="2,4,4")
    by_phase = {p: phase_rows(data, tok, p, seed=0) for p in (1, 2, 3)}
    # phase 1: 2 of main's 10 train rows + all 3 of extra's; eval: 2 + 1
    assert [len(x) for x in by_phase[1]] == [5, 3]
    assert sum(" x Assistant:" in r.prompt for r in by_phase[1][0]) == 3
    for p in (2, 3):
        train, evals = by_phase[p]
        assert [len(x) for x in by_phase[p]] == [4, 4]
        assert not any(" x Assistant:" in r.prompt or " xe Assistant:" in r.prompt for r in train + evals)
    main_train = [set(by_phase[p][0]) - {r for r in by_phase[1][0] if " x " in r.prompt} for p in (1, 2, 3)]
    assert main_train[0].isdisjoint(main_train[1]) and main_train[1].isdisjoint(main_train[2])


def dschat_split_indices(data_split: str, n: int, seed: int, split_index: int) -> list[int]:
    """DeepSpeed-Chat's get_raw_dataset_split_index + get_shuffle_idx (dschat/utils/data/data_utils.py), written
    out from its rule: normalised weights, cumulative int(round(share * n)) cuts, every cut after the first
    shifted by the excess over n, a numpy RandomState(seed) shuffle of arange(n), range `split_index`."""
    import numpy as np

    splits = [float(s) for s in data_split.split(",")]
    splits = [s / sum(splits) for s in splits]
    index = [0]
    for i, share in enumerate(splits):
        index.append(index[i] + int(round(share * float(n))))
    diff = index[-1] - n
    for i in range(1, len(index)):
        index[i] -= diff
    shuffle = np.arange(start=0, stop=n, step=1, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(shuffle)
    return shuffle[index[split_index]:index[split_index + 1]].tolist()


# 0,1,1 of 3 rows: cuts 0, 2, 4 shifted by the excess 1 to 0, -1, 1, 3 (its odd case of a negative cut).
@pytest.mark.parametrize("split", ["2,4,4", "6,2,2", "1,1,1", "10,0,0", "0,1,1"])
@pytest.mark.parametrize("n", [3, 7, 10, 101, 4000])
def test_dschat_rule_selects_deepspeed_chats_rows(split, n):
    from engine.data.split import dschat_phase_slice

    weights = parse_data_split(split)
    for phase in (1, 2, 3):
        assert dschat_phase_slice(n, weights, phase, seed=1234) == dschat_split_indices(split, n, 1234, phase - 1)


def test_the_split_rule_is_chosen_by_data_split_compat(tmp_path, tok):
    from engine.data.split import dschat_phase_slice

    folder = tmp_path / "d"
    folder.mkdir()
    rows = sort_rows(50, "r ")
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "eval.jsonl", sort_rows(10, "e "))
    ours = {p: phase_slice(50, W244, p, seed=1234) for p in (1, 2, 3)}
    theirs = {p: dschat_phase_slice(50, W244, p, seed=1234) for p in (1, 2, 3)}
    assert any(set(ours[p]) != set(theirs[p]) for p in (1, 2, 3))  # the flag matters on this seed
    for compat, picked in (("none", ours), ("dschat", theirs)):
        data = DataArgs(data_path=[str(folder)], data_split="2,4,4", data_split_compat=compat)
        train, _ = phase_rows(data, tok, 2, seed=1234)
        assert [r.prompt for r in train] == [rows[i]["prompt"] for i in picked[2]]


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------
ROW_A = Row(" Human: sort 3 1 Assistant:", " 1 3")           # 7 prompt + 2 answer + eos = 10
ROW_B = Row(" Human: sort 1 Assistant:", " 1")               # 6 prompt + 1 answer + eos = 8
ROW_C = Row(" Human: sort 3 1 4 2 Assistant:", " 1 2 3 4")   # 9 prompt + 4 answer + eos = 14


def test_tokenize_sft_row_by_hand(tok):
    ids, n_prompt = tokenize_sft_row(ROW_A, tok, EOS)
    #           " Human" ":"  " sort" " 3" " 1" " Assistant" ":"  | " 1" " 3" | eos
    assert ids == [HUMAN, COLON, SORT, T3, T1, ASSISTANT, COLON, T1, T3, EOS]
    assert n_prompt == 7


def test_tokenize_sft_row_with_a_custom_end_token(tok):
    ids, n_prompt = tokenize_sft_row(ROW_B, tok, end_id=0)
    assert ids == [HUMAN, COLON, SORT, T1, ASSISTANT, COLON, T1, 0]
    assert n_prompt == 6


def _data(**kw) -> Step1DataArgs:
    return Step1DataArgs(**kw)


def test_tokenize_rows_truncate(tok):
    stats = TokenizeStats()
    seqs, plens = tokenize_rows([ROW_A, ROW_B, ROW_C], tok, _data(max_seq_len=9), EOS, stats)
    # A: 10 > 9 -> cut to 9 (loses eos), prompt 7 < 9 kept.  B: 8 <= 9 kept.
    # C: 14 > 9 -> cut to 9 = its whole prompt -> dropped, nothing to learn.
    assert seqs == [[HUMAN, COLON, SORT, T3, T1, ASSISTANT, COLON, T1, T3],
                    [HUMAN, COLON, SORT, T1, ASSISTANT, COLON, T1, EOS]]
    assert plens == [7, 6]
    assert stats == TokenizeStats(rows=3, kept=2, truncated=2, dropped_overlength=0, dropped_no_answer=1)


def test_tokenize_rows_drop(tok):
    stats = TokenizeStats()
    seqs, plens = tokenize_rows([ROW_A, ROW_B, ROW_C], tok, _data(max_seq_len=9, overlength="drop"),
                                EOS, stats)
    # A (10) and C (14) are over 9: dropped; B (8) kept whole
    assert seqs == [[HUMAN, COLON, SORT, T1, ASSISTANT, COLON, T1, EOS]]
    assert plens == [6]
    assert stats == TokenizeStats(rows=3, kept=1, truncated=0, dropped_overlength=2, dropped_no_answer=0)


def test_prompt_exactly_filling_the_limit_is_dropped(tok):
    stats = TokenizeStats()
    seqs, _ = tokenize_rows([ROW_A], tok, _data(max_seq_len=7), EOS, stats)  # 7 = A's prompt
    assert seqs == [] and stats.dropped_no_answer == 1 and stats.truncated == 1
    stats = TokenizeStats()
    seqs, _ = tokenize_rows([ROW_A], tok, _data(max_seq_len=8), EOS, stats)  # one answer token left
    assert seqs == [[HUMAN, COLON, SORT, T3, T1, ASSISTANT, COLON, T1]] and stats.kept == 1


def test_train_on_prompt_keeps_prompt_only_rows(tok):
    stats = TokenizeStats()
    seqs, plens = tokenize_rows([ROW_C], tok, _data(max_seq_len=9, train_on_prompt=True), EOS, stats)
    assert seqs == [[HUMAN, COLON, SORT, T3, T1, T4, T2, ASSISTANT, COLON]] and plens == [9]
    assert stats.kept == 1 and stats.dropped_no_answer == 0


# ----------------------------------------------------------------------------------------------
# Dataset, labels and collator
# ----------------------------------------------------------------------------------------------
def _dataset(train_on_prompt: bool) -> SFTDataset:
    tensors = pack_sequences([[5, 6, 7, 8, EOS], [9, 10, EOS]]) | {"prompt_lens": torch.tensor([3, 1])}
    return SFTDataset(tensors, train_on_prompt)


def test_labels_are_ignored_on_prompt_tokens():
    ds = _dataset(train_on_prompt=False)
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == [5, 6, 7, 8, EOS]
    assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * 3 + [8, EOS]   # prompt of 3
    assert ds[1]["labels"].tolist() == [IGNORE_INDEX, 10, EOS]          # prompt of 1


def test_labels_cover_the_prompt_with_train_on_prompt():
    ds = _dataset(train_on_prompt=True)
    assert ds[0]["labels"].tolist() == [5, 6, 7, 8, EOS]
    assert ds[1]["labels"].tolist() == [9, 10, EOS]


def test_collate_right_padded():
    ds = _dataset(train_on_prompt=False)
    batch = collate_right_padded([ds[1], ds[0]], pad_id=0)
    assert batch["input_ids"].tolist() == [[9, 10, EOS, 0, 0], [5, 6, 7, 8, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 10, EOS, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, EOS]]
    assert all(t.dtype == torch.long for t in batch.values())


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def _local_data(tmp_path: Path, **kw) -> Step1DataArgs:
    path = tmp_path / "d.jsonl"
    if not path.exists():
        write_jsonl(path, sort_rows(10))
    return Step1DataArgs(data_path=[str(path)], **kw)


def test_cache_key_is_stable(tmp_path, tok):
    data = _local_data(tmp_path)
    key = cache_key(data, tok, 1, 7)
    assert cache_key(_local_data(tmp_path), tok, 1, 7) == key
    # Settings applied after the cache (the cache folder, loss on prompt) do not change it...
    assert cache_key(_local_data(tmp_path, data_output_path=str(tmp_path / "elsewhere")), tok, 1, 7) == key


@pytest.mark.parametrize("change", [
    dict(max_seq_len=256), dict(data_split="6,2,2"), dict(overlength="drop"), dict(add_eot_token=True),
    dict(data_split_compat="dschat"),
])
def test_cache_key_changes_with_data_settings(tmp_path, tok, change):
    assert cache_key(_local_data(tmp_path, **change), tok, 1, 7) != cache_key(_local_data(tmp_path), tok, 1, 7)


def test_cache_key_changes_with_seed_and_phase(tmp_path, tok):
    data = _local_data(tmp_path)
    assert len({cache_key(data, tok, 1, 7), cache_key(data, tok, 1, 8), cache_key(data, tok, 2, 7)}) == 3


def test_cache_key_changes_when_the_file_changes(tmp_path, tok):
    data = _local_data(tmp_path)
    before = cache_key(data, tok, 1, 7)
    write_jsonl(tmp_path / "d.jsonl", sort_rows(11))
    assert cache_key(data, tok, 1, 7) != before


def test_cache_key_changes_on_same_size_edit_with_kept_mtime(tmp_path, tok):
    data = _local_data(tmp_path)
    path = tmp_path / "d.jsonl"
    stat = path.stat()
    before = cache_key(data, tok, 1, 7)
    path.write_text(path.read_text().replace(" 3", " 4"))  # same size, other content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert cache_key(data, tok, 1, 7) != before


DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_load_sft_data_builds_then_reuses_a_safetensors_cache(tmp_path, tok, monkeypatch):
    data = _local_data(tmp_path, data_split="10,0,0", max_seq_len=64)
    cache_dir = tmp_path / "cache"
    train, evals = load_sft_data(data, tok, cache_dir, 3, DIST)
    files = list(cache_dir.iterdir())
    assert [f.name for f in files] == [f"sft_{cache_key(data, tok, 1, 3)}.safetensors"]
    # 10 rows, one carved for eval (10% of 10); all 9 others in step 1 with split 10,0,0
    assert (len(train), len(evals)) == (9, 1)
    # " Human: sort i Assistant:" = 6 prompt tokens, " i" = 1, eos = 1
    assert all(len(item["input_ids"]) == 8 for item in train)
    assert all(item["labels"].tolist()[:6] == [IGNORE_INDEX] * 6 for item in train)
    assert all(item["input_ids"][-1] == EOS for item in train)

    tensors = load_file(str(files[0]))  # safetensors, so no pickle is involved
    assert set(tensors) == {f"{s}/{k}" for s in ("train", "eval") for k in ("input_ids", "offsets", "prompt_lens")}
    assert tensors["train/offsets"].tolist() == [8 * i for i in range(10)]

    mtime = files[0].stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(sft, "_build", no_rebuild)
    train2, _ = load_sft_data(data, tok, cache_dir, 3, DIST)
    assert files[0].stat().st_mtime_ns == mtime
    assert [x["input_ids"].tolist() for x in train2] == [x["input_ids"].tolist() for x in train]


def test_load_sft_data_with_no_usable_rows_is_a_user_error(tmp_path, tok):
    # max_seq_len 6 = every prompt's length: nothing left to learn from
    data = _local_data(tmp_path, data_split="10,0,0", max_seq_len=6)
    with pytest.raises(UserError, match="no usable training rows"):
        load_sft_data(data, tok, tmp_path / "cache", 3, DIST)


def test_cache_built_with_train_on_prompt_is_not_reused_without_it(tmp_path, tok):
    folder = tmp_path / "src"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": ROW_A.prompt, "chosen": ROW_A.chosen},
                                         {"prompt": ROW_C.prompt, "chosen": ROW_C.chosen}])
    write_jsonl(folder / "eval.jsonl", [{"prompt": ROW_A.prompt, "chosen": ROW_A.chosen}])
    common = dict(data_path=[str(folder)], data_split="10,0,0", max_seq_len=9)
    load_sft_data(Step1DataArgs(train_on_prompt=True, **common), tok, tmp_path / "cache", 0, DIST)
    train, _ = load_sft_data(Step1DataArgs(train_on_prompt=False, **common), tok, tmp_path / "cache", 0, DIST)
    # Built fresh without train_on_prompt, C (prompt 9 = the limit) is dropped: 1 row, with labels.
    assert len(train) == 1
    assert all((item["labels"] != IGNORE_INDEX).any() for item in train)


# ----------------------------------------------------------------------------------------------
# The bundled sorting task
# ----------------------------------------------------------------------------------------------
PROMPT = " Human: sort 3 1 Assistant:"


@pytest.mark.parametrize("answer, correct", [
    (" 1 3", True),
    ("1 3", True),                       # spacing is ignored
    (" 1  3 \n", True),
    (" 1 3<|endoftext|>", True),         # a trailing end marker is allowed
    (" 3 1", False),                     # unsorted
    (" 1", False),                       # a digit missing
    (" 1 3 3", False),                   # one too many
    (" 1 3 done", False),                # extra text
    ("", False),
])
def test_is_correct(answer, correct):
    assert is_correct(PROMPT, answer) is correct


def test_is_correct_with_repeated_digits():
    assert is_correct(" Human: sort 2 0 2 Assistant:", " 0 2 2")
    assert not is_correct(" Human: sort 2 0 2 Assistant:", " 0 2")


def test_is_correct_refuses_a_foreign_prompt():
    with pytest.raises(ValueError, match="not a sorting-task prompt"):
        is_correct(" Human: hello Assistant:", " hi")


def test_every_bundled_row_prefers_the_correct_answer():
    lines = (ASSET_DIR / "train.jsonl").read_text().splitlines()
    assert len(lines) == 4000
    for line in lines:
        rec = json.loads(line)
        assert is_correct(rec["prompt"], rec["chosen"]), rec
        assert not is_correct(rec["prompt"], rec["rejected"]), rec


def test_write_bundle_reproduces_the_shipped_files(tmp_path):
    write_bundle(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ASSET_DIR / name).read_bytes(), name
