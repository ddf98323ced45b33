"""Offline tests of engine.data.hub: every DeepSpeed-Chat hub name, on tiny fake datasets.

Each fake dataset has the column schema of the real hub dataset, so the adapters are checked
against the shapes they will meet, and the expected prompt/chosen/rejected strings are written out
by hand from DeepSpeed-Chat's formatting rules rather than computed with the code under test.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.data.hub import HUB_DATASETS, find_hub_dataset, load_hub_dataset
from engine.data.rows import Row, carve_eval
from engine.errors import UserError

Splits = dict[str, list[dict[str, Any]]]


class FakeLoader:
    """Stands in for datasets.load_dataset: returns fixed splits and records how it was called."""

    def __init__(self, splits: Splits) -> None:
        self.splits = splits
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Splits:
        self.calls.append(args)
        return self.splits


@dataclass
class Case:
    name: str
    splits: Splits
    expected: Row                       # one row that must come out, exactly
    usable: int                         # usable rows over all splits
    skipped: int = 0                    # unusable rows the adapter must drop (and report)
    call: tuple[Any, ...] = ()          # expected loader arguments; () means (name,)
    extra: list[Row] = field(default_factory=list)  # further rows that must come out


# --------------------------------------------------------------------------- fake rows per schema


def _pairs(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    # Dahoas/rm-static and Dahoas/full-hh-rlhf: prompt, response, chosen, rejected.
    return {"prompt": prompt, "response": chosen, "chosen": chosen, "rejected": rejected}


def _webgpt(question: str, a0: str, s0: float, a1: str, s1: float) -> dict[str, Any]:
    quotes = {"title": ["Some page"], "extract": ["Some extract."]}
    return {"question": {"id": "q", "full_text": question, "dataset": "eli5"},
            "quotes_0": quotes, "answer_0": a0, "tokens_0": ["x"], "score_0": s0,
            "quotes_1": quotes, "answer_1": a1, "tokens_1": ["y"], "score_1": s1}


def _shp(history: str, ref_a: str, ref_b: str, labels: int) -> dict[str, Any]:
    return {"post_id": "p1", "domain": "askscience_train", "upvote_ratio": 0.9,
            "history": history, "c_root_id_A": "a", "c_root_id_B": "b",
            "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 10, "score_B": 3,
            "human_ref_A": ref_a, "human_ref_B": ref_b, "labels": labels,
            "seconds_difference": 1.0, "score_ratio": 3.3}


def _miracl(query: str, positives: list[str], negatives: list[str]) -> dict[str, Any]:
    def passages(texts: list[str]) -> list[dict[str, Any]]:
        return [{"docid": f"{i}#0", "title": "Title", "text": t, "emb": [0.1, 0.2]}
                for i, t in enumerate(texts)]
    return {"query_id": "1", "query": query,
            "positive_passages": passages(positives), "negative_passages": passages(negatives)}


def _mkqa(queries: dict[str, str], answers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"example_id": "42", "query": queries.get("en", ""), "queries": queries,
            "answers": answers}


def _mkqa_answer(text: str | None, type_: int = 0) -> dict[str, Any]:
    # type is a ClassLabel: 0 entity ... 2 unanswerable (whose text is None).
    return {"type": type_, "entity": None if text is None else "Q1", "text": text, "aliases": []}


_MKQA_ROWS = [
    _mkqa({"en": "capital of japan", "ja": "日本の首都は？", "zh_cn": "日本的首都是哪里？"},
          {"en": [_mkqa_answer("Tokyo")], "ja": [_mkqa_answer("東京")],
           "zh_cn": [_mkqa_answer("东京")]}),
    _mkqa({"en": "who wrote hamlet", "ja": "ハムレットの作者は？", "zh_cn": "哈姆雷特的作者是谁？"},
          {"en": [_mkqa_answer("Shakespeare")], "ja": [_mkqa_answer("シェイクスピア")],
           "zh_cn": [_mkqa_answer("莎士比亚")]}),
    _mkqa({"en": "what is love", "ja": "愛とは？", "zh_cn": "爱是什么？"},  # unanswerable
          {"en": [_mkqa_answer(None, 2)], "ja": [_mkqa_answer(None, 2)],
           "zh_cn": [_mkqa_answer(None, 2)]}),
]


def _jaquad_qg(question: str, sentence: str) -> dict[str, Any]:
    return {"answer": "答え", "paragraph_question": "q", "question": question,
            "sentence": sentence, "paragraph": "段落。", "sentence_answer": "s",
            "paragraph_answer": "p", "paragraph_sentence": "ps"}


def _jaquad_qag(paragraph: str, questions: list[str]) -> dict[str, Any]:
    return {"paragraph": paragraph, "questions": questions, "answers": ["a"] * len(questions),
            "questions_answers": "question: q, answer: a"}


CASES = [
    Case("Dahoas/rm-static", {
        "train": [_pairs("\n\nHuman: What is 2+2?\n\nAssistant:", " 4.", " 5."),
                  _pairs("\n\nHuman: Hi\n\nAssistant:", "", " Go away.")],
        "test": [_pairs("\n\nHuman: Capital of France?\n\nAssistant:", " Paris.", " Rome.")]},
        Row("\n\nHuman: What is 2+2?\n\nAssistant:", " 4.", " 5."), usable=2, skipped=1,
        extra=[Row("\n\nHuman: Capital of France?\n\nAssistant:", " Paris.", " Rome.")]),
    Case("Dahoas/full-hh-rlhf", {
        "train": [_pairs("\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did...", " No."),
                  _pairs("\n\nHuman: Q\n\nAssistant:", " A", None)],
        "test": [_pairs("\n\nHuman: Thanks!\n\nAssistant:", " You're welcome.", " Whatever.")]},
        Row("\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did...", " No."),
        usable=2, skipped=1),
    Case("Dahoas/synthetic-instruct-gptj-pairwise", {"train": [
        {"prompt": "How do I boil an egg?", "chosen": "Put it in boiling water for 8 minutes.",
         "rejected": "Eggs are oval."},
        {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": "", "chosen": "Orphan answer.", "rejected": "Other."}]},
        Row(" Human: How do I boil an egg? Assistant:",
            " Put it in boiling water for 8 minutes.", " Eggs are oval."), usable=2, skipped=1),
    Case("yitingxie/rlhf-reward-datasets", {
        "train": [{"prompt": "\n\nHuman: How do I bake bread?\n\n",
                   "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.",
                   "rejected": "Assistant: I don't know."},
                  {"prompt": "\n\nHuman: Hi\n\n", "chosen": "Assistant:",  # empty reply
                   "rejected": "Assistant: x"}],
        "test": [{"prompt": "\n\nHuman: Bye\n\n", "chosen": "Assistant: Goodbye!",
                  "rejected": "Assistant: Hm."}]},
        Row("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour and water.",
            " I don't know."), usable=2, skipped=1),
    Case("openai/webgpt_comparisons", {"train": [
        _webgpt("Why is the sky blue?", "Rayleigh scattering [1] makes it blue.", -0.5,
                "Because of the sun (2).", 0.5),
        _webgpt("Is water wet?", "Yes[3].", 0.0, "No.", 0.0),  # tie: answer_0 is chosen
        _webgpt("Empty answer?", "", 1.0, "Something.", -1.0)]},
        Row(" Human: Why is the sky blue? Assistant:", " Because of the sun.",
            " Rayleigh scattering makes it blue."), usable=2, skipped=1,
        extra=[Row(" Human: Is water wet? Assistant:", " Yes.", " No.")]),
    Case("stanfordnlp/SHP", {
        "train": [_shp("Is coffee bad for you?", "Yes.", "In moderation it is fine.", 0),
                  _shp("", "A", "B", 1)],
        "validation": [_shp("Why do cats purr?", "Contentment, mostly.", "Magic.", 1)],
        "test": [_shp("Unused test split", "A", "B", 1)]},
        Row(" Human: Is coffee bad for you? Assistant:", " In moderation it is fine.", " Yes."),
        usable=2, skipped=1,
        extra=[Row(" Human: Why do cats purr? Assistant:", " Contentment, mostly.", " Magic.")]),
    Case("pvduy/sharegpt_alpaca_oa_vicuna_format", {
        "train": [{"prompt": "USER: Hello ASSISTANT:", "label": "Hi there!"},
                  {"prompt": "USER: Anyone? ASSISTANT:", "label": None}],
        "test": [{"prompt": "USER: 1+1? ASSISTANT: 2 USER: 2+2? ASSISTANT:", "label": "4"}]},
        Row("Human: Hello Assistant:", " Hi there!", None), usable=2, skipped=1,
        extra=[Row("Human: 1+1? Assistant: 2 Human: 2+2? Assistant:", " 4", None)]),
    Case("wangrui6/Zhihu-KOL", {"train": [
        {"INSTRUCTION": "如何学习编程？", "RESPONSE": "多写代码。", "SOURCE": "Zhihu",
         "METADATA": "{\"upvotes\": 3}"},
        {"INSTRUCTION": "为什么天是蓝的？", "RESPONSE": "瑞利散射。", "SOURCE": "Zhihu",
         "METADATA": "{}"},
        {"INSTRUCTION": None, "RESPONSE": "无题。", "SOURCE": "Zhihu", "METADATA": "{}"}]},
        Row(" Human: 如何学习编程？ Assistant:", " 多写代码。", None), usable=2, skipped=1),
    Case("Cohere/miracl-zh-queries-22-12", {
        "train": [_miracl("北京是哪个国家的首都？", ["北京是中国的首都。"], ["上海是城市。"]),
                  _miracl("没有负例？", ["只有正例。"], []),
                  _miracl("没有正例？", [], ["负例。"])],
        "dev": [_miracl("长城有多长？", ["长城很长。"], ["黄河很长。"])]},
        Row(" Human: 北京是哪个国家的首都？ Assistant:", " 北京是中国的首都。", " 上海是城市。"),
        usable=3, skipped=1, extra=[Row(" Human: 没有负例？ Assistant:", " 只有正例。", None)]),
    Case("Hello-SimpleAI/HC3-Chinese", {"train": [
        {"id": "0", "question": "什么是人工智能？", "human_answers": ["让机器像人一样思考。"],
         "chatgpt_answers": ["人工智能是计算机科学的一个分支。"]},
        {"id": "1", "question": "1+1等于几？", "human_answers": ["2"], "chatgpt_answers": ["二"]},
        {"id": "2", "question": "无人回答？", "human_answers": [], "chatgpt_answers": ["有"]}]},
        Row(" Human: 什么是人工智能？ Assistant:", " 让机器像人一样思考。", None),
        usable=2, skipped=1, call=("Hello-SimpleAI/HC3-Chinese", "all")),
    Case("mkqa-Chinese", {"train": _MKQA_ROWS},
         Row(" Human: 日本的首都是哪里？ Assistant:", " 东京", None),
         usable=2, skipped=1, call=("mkqa",)),
    Case("mkqa-Japanese", {"train": _MKQA_ROWS},
         Row(" Human: 日本の首都は？ Assistant:", " 東京", None),
         usable=2, skipped=1, call=("mkqa",)),
    Case("Cohere/miracl-ja-queries-22-12", {
        "train": [_miracl("富士山の高さは？", ["富士山は3776メートルです。"], ["琵琶湖は湖です。"]),
                  _miracl("", ["空の質問。"], ["x"])],
        "dev": [_miracl("日本の首都は？", ["東京です。"], [])]},
        Row(" Human: 富士山の高さは？ Assistant:", " 富士山は3776メートルです。", " 琵琶湖は湖です。"),
        usable=2, skipped=1, extra=[Row(" Human: 日本の首都は？ Assistant:", " 東京です。", None)]),
    Case("lmqg/qg_jaquad", {
        "train": [_jaquad_qg("日本の首都はどこ？", "日本の首都は東京である。"),
                  _jaquad_qg("文が無い？", "")],
        "validation": [_jaquad_qg("富士山はどこ？", "富士山は静岡県と山梨県にある。")],
        "test": [_jaquad_qg("未使用", "未使用。")]},
        Row(" Human: 日本の首都はどこ？ Assistant:", " 日本の首都は東京である。", None),
        usable=2, skipped=1),
    Case("lmqg/qag_jaquad", {
        "train": [_jaquad_qag("東京は日本の首都である。", ["日本の首都は？", "東京はどこの首都？"]),
                  _jaquad_qag("質問の無い段落。", [])],
        "validation": [_jaquad_qag("富士山は高い。", ["富士山は高い？"])]},
        Row(" Human: 日本の首都は？ Assistant:", " 東京は日本の首都である。", None),
        usable=2, skipped=1),
]


def test_every_hub_dataset_has_a_case() -> None:
    assert sorted(c.name for c in CASES) == sorted(HUB_DATASETS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_load_hub_dataset_forms_rows_like_deepspeed_chat(
        case: Case, caplog: pytest.LogCaptureFixture) -> None:
    loader = FakeLoader(case.splits)
    with caplog.at_level(logging.WARNING, logger="engine.data.hub"):
        train, eval_rows = load_hub_dataset(case.name, seed=1, loader=loader)

    assert loader.calls == [case.call or (case.name,)]
    every = train + eval_rows
    assert case.expected in every
    for row in case.extra:
        assert row in every
    assert len(every) == case.usable
    assert train and eval_rows  # each dataset here is big enough for both parts
    if case.skipped:
        assert f"'{case.name}': skipped {case.skipped} unusable" in caplog.text


def test_datasets_with_an_eval_split_keep_it() -> None:
    splits = next(c.splits for c in CASES if c.name == "stanfordnlp/SHP")
    train, eval_rows = load_hub_dataset("stanfordnlp/SHP", seed=1, loader=FakeLoader(splits))
    assert eval_rows == [Row(" Human: Why do cats purr? Assistant:", " Contentment, mostly.",
                             " Magic.")]
    assert train == [Row(" Human: Is coffee bad for you? Assistant:",
                         " In moderation it is fine.", " Yes.")]


def test_find_hub_dataset_exact_substring_and_unknown() -> None:
    assert find_hub_dataset("Dahoas/rm-static") is HUB_DATASETS["Dahoas/rm-static"]
    mirrored = find_hub_dataset("/mnt/hf-mirror/Dahoas/rm-static")
    assert mirrored is not None and mirrored.name == "Dahoas/rm-static"
    assert find_hub_dataset("lmqg/qag_jaquad").adapt is not find_hub_dataset("lmqg/qg_jaquad").adapt
    assert find_hub_dataset("mkqa-Japanese").hub_name == "mkqa"
    assert find_hub_dataset("someone/unknown-dataset") is None
    assert find_hub_dataset("mkqa") is None  # ambiguous: which language?


def test_local_mirror_path_is_loaded_from_where_it_is(tmp_path: Path) -> None:
    mirror = tmp_path / "Dahoas" / "rm-static"
    mirror.mkdir(parents=True)
    loader = FakeLoader(CASES[0].splits)
    load_hub_dataset(str(mirror), seed=1, loader=loader)
    assert loader.calls == [(str(mirror),)]


def _synthetic_rows(n: int) -> Splits:
    return {"train": [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                      for i in range(n)]}


def test_eval_carve_out_is_ten_percent_deterministic_and_disjoint() -> None:
    name = "Dahoas/synthetic-instruct-gptj-pairwise"
    train, eval_rows = load_hub_dataset(name, seed=7, loader=FakeLoader(_synthetic_rows(50)))
    again = load_hub_dataset(name, seed=7, loader=FakeLoader(_synthetic_rows(50)))
    other = load_hub_dataset(name, seed=8, loader=FakeLoader(_synthetic_rows(50)))

    assert (len(train), len(eval_rows)) == (45, 5)
    assert (train, eval_rows) == again
    assert eval_rows != other[1]  # the seed, not the data, picks the held-out rows
    assert not set(train) & set(eval_rows)
    assert {r.prompt for r in train + eval_rows} == {f" Human: q{i} Assistant:" for i in range(50)}


def test_carve_eval_leaves_a_single_row_in_train() -> None:
    row = Row(" Human: q Assistant:", " a")
    assert carve_eval([row], seed=0) == ([row], [])


def test_missing_eval_split_falls_back_to_carving(caplog: pytest.LogCaptureFixture) -> None:
    rows = [_pairs(f"\n\nHuman: q{i}\n\nAssistant:", f" a{i}", f" b{i}") for i in range(20)]
    with caplog.at_level(logging.WARNING, logger="engine.data.hub"):
        train, eval_rows = load_hub_dataset("Dahoas/rm-static", 3, FakeLoader({"train": rows}))
    assert (len(train), len(eval_rows)) == (18, 2)
    assert "no 'test' split" in caplog.text


def test_loader_failure_becomes_user_error() -> None:
    def offline_loader(*args: Any) -> Splits:
        raise ConnectionError("network is unreachable")

    with pytest.raises(UserError) as err:
        load_hub_dataset("Dahoas/full-hh-rlhf", seed=1, loader=offline_loader)
    message = str(err.value)
    assert "Dahoas/full-hh-rlhf" in message
    assert "network" in message and "local file path" in message


def test_unknown_name_and_missing_train_split_are_user_errors() -> None:
    with pytest.raises(UserError, match="someone/unknown"):
        load_hub_dataset("someone/unknown", seed=1, loader=FakeLoader({}))
    with pytest.raises(UserError, match="no 'train' split"):
        load_hub_dataset("Dahoas/rm-static", seed=1, loader=FakeLoader({"validation": []}))


def test_no_usable_rows_is_a_user_error() -> None:
    bad = {"train": [{"prompt": "", "chosen": "", "rejected": ""}], "test": []}
    with pytest.raises(UserError, match="no usable training rows"):
        load_hub_dataset("Dahoas/rm-static", seed=1, loader=FakeLoader(bad))


def test_real_datasets_json_loader_with_rm_static_schema(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        files[split] = tmp_path / f"{split}.jsonl"
        with files[split].open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(_pairs(f"\n\nHuman: {split} q{i}\n\nAssistant:",
                                          f" yes {i}", f" no {i}")) + "\n")

    def json_loader(*args: Any) -> Any:
        return datasets.load_dataset("json", cache_dir=str(tmp_path / "cache"),
                                     data_files={k: str(v) for k, v in files.items()})

    train, eval_rows = load_hub_dataset("Dahoas/rm-static", seed=1, loader=json_loader)
    assert len(train) == 3 and len(eval_rows) == 2
    assert train[0] == Row("\n\nHuman: train q0\n\nAssistant:", " yes 0", " no 0")
    assert eval_rows[1] == Row("\n\nHuman: test q1\n\nAssistant:", " yes 1", " no 1")


def test_default_loader_reads_a_saved_local_mirror(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [_pairs(f"\n\nHuman: q{i}\n\nAssistant:", f" yes {i}", f" no {i}") for i in range(2)]
    mirror = tmp_path / "Dahoas" / "rm-static"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(mirror))

    train, eval_rows = load_hub_dataset(str(mirror), seed=1)  # no loader: the real default
    assert train[1] == Row("\n\nHuman: q1\n\nAssistant:", " yes 1", " no 1")
    assert eval_rows == [Row("\n\nHuman: q0\n\nAssistant:", " yes 0", " no 0")]
