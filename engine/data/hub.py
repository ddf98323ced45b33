"""Hugging Face Hub datasets known by their DeepSpeed-Chat names, normalised to `Row`s.

Each supported dataset is one `HubSpec`: where it lives on the Hub, which splits hold train and
eval data, and a small pure adapter that turns one raw row (a dict) into a `Row`, or into `None`
when the row is unusable. Prompts and answers are formed the way DeepSpeed-Chat forms them, so a
checkpoint trained here sees the same text it would have seen there:

* prompt  = " Human: " + question + " Assistant:"   (unless the hub row already carries the turns)
* answers = " " + answer                            (the leading space joins prompt and answer)

Datasets that ship only a train split get a seeded, deterministic 10% eval split carved out of it.
`datasets` is imported lazily so that this module (and its tests) work without it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.data.rows import EVAL_FRACTION, Row, carve_eval
from engine.errors import UserError

logger = logging.getLogger(__name__)

# DeepSpeed-Chat splits train-only datasets 9:1 into train and eval.

Adapter = Callable[[Mapping[str, Any]], "Row | None"]
Loader = Callable[..., Mapping[str, Iterable[Mapping[str, Any]]]]


@dataclass(frozen=True)
class HubSpec:
    """Where a hub dataset lives and how one of its rows becomes a `Row`."""

    name: str                  # the DeepSpeed-Chat name users pass (also the HUB_DATASETS key)
    hub_name: str              # what is passed to `load_dataset` (differs for the mkqa variants)
    config: str | None         # hub config name, for datasets that need one
    train_split: str
    eval_split: str | None     # None: carve EVAL_FRACTION of train out as eval
    adapt: Adapter


# --------------------------------------------------------------------------- small field helpers


def _text(value: Any) -> str | None:
    """`value` if it is a string with some non-space content, else None (unusable)."""
    return value if isinstance(value, str) and value.strip() else None


def _first(value: Any) -> Any:
    """First element of a non-empty list/tuple, else None (hub lists are often empty)."""
    return value[0] if isinstance(value, (list, tuple)) and value else None


def _get(value: Any, key: str) -> Any:
    """`value[key]` for a mapping, else None, so nested lookups never raise on odd rows."""
    return value.get(key) if isinstance(value, Mapping) else None


def _human_prompt(question: Any) -> str | None:
    """DeepSpeed-Chat's single-turn prompt around a question, or None if there is no question."""
    question = _text(question)
    return None if question is None else " Human: " + question + " Assistant:"


def _answer(text: Any) -> str | None:
    """DeepSpeed-Chat's answer form: a leading space, so prompt + answer reads as one text."""
    text = _text(text)
    return None if text is None else " " + text


def _row(prompt: str | None, chosen: str | None, rejected: str | None = None,
         *, needs_rejected: bool = False) -> Row | None:
    """A Row, or None when the prompt/chosen (or a required rejected) answer is missing."""
    if prompt is None or chosen is None or (needs_rejected and rejected is None):
        return None
    return Row(prompt=prompt, chosen=chosen, rejected=rejected)


# ------------------------------------------------------------------------- one adapter per dataset


def _adapt_prompt_pairs(row: Mapping[str, Any]) -> Row | None:
    # prompt/chosen/rejected (+response); prompt already holds "\n\nHuman: ...\n\nAssistant:".
    prompt, chosen, rejected = (_text(row.get(k)) for k in ("prompt", "chosen", "rejected"))
    return _row(prompt, chosen, rejected, needs_rejected=True)


def _adapt_synthetic_gptj(row: Mapping[str, Any]) -> Row | None:
    # prompt/chosen/rejected, all bare text without any Human/Assistant markers.
    return _row(_human_prompt(row.get("prompt")), _answer(row.get("chosen")),
                _answer(row.get("rejected")), needs_rejected=True)


def _after_last_assistant(text: Any) -> str | None:
    """The last assistant turn of an hh-style transcript (what follows the final "Assistant:")."""
    text = _text(text)
    return None if text is None else _text(text.split("Assistant:")[-1])


def _adapt_yitingxie(row: Mapping[str, Any]) -> Row | None:
    # prompt/chosen/rejected; prompt lacks the final "Assistant:", answers hold it before the reply.
    prompt = _text(row.get("prompt"))
    return _row(None if prompt is None else prompt + "Assistant:",
                _after_last_assistant(row.get("chosen")),
                _after_last_assistant(row.get("rejected")), needs_rejected=True)


# WebGPT answers cite browsing results as "[1]" or "(2)"; without browsing they only confuse the
# model, so (as DeepSpeed-Chat does) drop every bracketed span together with a space before it.
_CITATION = re.compile(r" ?[\[(].*?[\])]")


def _adapt_webgpt(row: Mapping[str, Any]) -> Row | None:
    # question{full_text,..}, answer_0/1, score_0/1 (+quotes_0/1, tokens_0/1); higher score wins.
    try:
        # A tie keeps answer_0 as chosen, as DeepSpeed-Chat does.
        first_wins = float(row["score_0"]) >= float(row["score_1"])
    except (KeyError, TypeError, ValueError):
        return None
    better, worse = ("answer_0", "answer_1") if first_wins else ("answer_1", "answer_0")
    cleaned = [_text(row.get(k)) for k in (better, worse)]
    chosen, rejected = (None if t is None else _answer(_CITATION.sub("", t)) for t in cleaned)
    return _row(_human_prompt(_get(row.get("question"), "full_text")), chosen, rejected,
                needs_rejected=True)


def _adapt_shp(row: Mapping[str, Any]) -> Row | None:
    # history, human_ref_A/human_ref_B, labels (1: A is preferred, 0: B) + scores and metadata.
    label = row.get("labels")
    if label not in (0, 1):
        return None
    better, worse = ("human_ref_A", "human_ref_B") if label == 1 else ("human_ref_B", "human_ref_A")
    return _row(_human_prompt(row.get("history")), _answer(row.get(better)),
                _answer(row.get(worse)), needs_rejected=True)


def _adapt_sharegpt_vicuna(row: Mapping[str, Any]) -> Row | None:
    # prompt ("USER: ... ASSISTANT:" turns, possibly several), label (the reply); no rejected.
    prompt = _text(row.get("prompt"))
    if prompt is not None:
        prompt = prompt.replace("USER", "Human").replace("ASSISTANT", "Assistant")
    return _row(prompt, _answer(row.get("label")))


def _adapt_zhihu(row: Mapping[str, Any]) -> Row | None:
    # INSTRUCTION, RESPONSE, SOURCE, METADATA; no rejected.
    return _row(_human_prompt(row.get("INSTRUCTION")), _answer(row.get("RESPONSE")))


def _adapt_miracl(row: Mapping[str, Any]) -> Row | None:
    # query_id, query, positive_passages/negative_passages: lists of {docid, title, text, (emb)}.
    # Some queries have no negative passage: keep them for SFT with rejected=None.
    chosen = _answer(_get(_first(row.get("positive_passages")), "text"))
    rejected = _answer(_get(_first(row.get("negative_passages")), "text"))
    return _row(_human_prompt(row.get("query")), chosen, rejected)


def _adapt_hc3_chinese(row: Mapping[str, Any]) -> Row | None:
    # id, question, human_answers (list), chatgpt_answers (list); DS-Chat uses no rejected.
    return _row(_human_prompt(row.get("question")), _answer(_first(row.get("human_answers"))))


def _adapt_mkqa(lang: str, row: Mapping[str, Any]) -> Row | None:
    # example_id, query, queries{lang: str}, answers{lang: [{type, entity, text, aliases}]}.
    # Unanswerable questions have text None: they are skipped.
    answer = _get(_first(_get(row.get("answers"), lang)), "text")
    return _row(_human_prompt(_get(row.get("queries"), lang)), _answer(answer))


def _adapt_qg_jaquad(row: Mapping[str, Any]) -> Row | None:
    # question, sentence (holds the answer), answer, paragraph + highlighted variants; no rejected.
    return _row(_human_prompt(row.get("question")), _answer(row.get("sentence")))


def _adapt_qag_jaquad(row: Mapping[str, Any]) -> Row | None:
    # paragraph, questions (list), answers (list), questions_answers; no rejected.
    return _row(_human_prompt(_first(row.get("questions"))), _answer(row.get("paragraph")))


def _spec(name: str, train: str, eval_: str | None, adapt: Adapter, *,
          hub_name: str | None = None, config: str | None = None) -> HubSpec:
    return HubSpec(name=name, hub_name=hub_name or name, config=config,
                   train_split=train, eval_split=eval_, adapt=adapt)


HUB_DATASETS: dict[str, HubSpec] = {s.name: s for s in (
    _spec("Dahoas/rm-static", "train", "test", _adapt_prompt_pairs),
    _spec("Dahoas/full-hh-rlhf", "train", "test", _adapt_prompt_pairs),
    _spec("Dahoas/synthetic-instruct-gptj-pairwise", "train", None, _adapt_synthetic_gptj),
    _spec("yitingxie/rlhf-reward-datasets", "train", "test", _adapt_yitingxie),
    _spec("openai/webgpt_comparisons", "train", None, _adapt_webgpt),
    _spec("stanfordnlp/SHP", "train", "validation", _adapt_shp),
    _spec("pvduy/sharegpt_alpaca_oa_vicuna_format", "train", "test", _adapt_sharegpt_vicuna),
    _spec("wangrui6/Zhihu-KOL", "train", None, _adapt_zhihu),
    _spec("Cohere/miracl-zh-queries-22-12", "train", "dev", _adapt_miracl),
    # HC3-Chinese is split into per-source configs; "all" is their union.
    _spec("Hello-SimpleAI/HC3-Chinese", "train", None, _adapt_hc3_chinese, config="all"),
    # Both mkqa names read the one multilingual "mkqa" dataset, each in its own language.
    _spec("mkqa-Chinese", "train", None, functools.partial(_adapt_mkqa, "zh_cn"), hub_name="mkqa"),
    _spec("mkqa-Japanese", "train", None, functools.partial(_adapt_mkqa, "ja"), hub_name="mkqa"),
    _spec("Cohere/miracl-ja-queries-22-12", "train", "dev", _adapt_miracl),
    _spec("lmqg/qg_jaquad", "train", "validation", _adapt_qg_jaquad),
    _spec("lmqg/qag_jaquad", "train", "validation", _adapt_qag_jaquad),
)}


# --------------------------------------------------------------------------- lookup and loading


def find_hub_dataset(name: str) -> HubSpec | None:
    """The spec for `name`: an exact DeepSpeed-Chat name, else one contained in `name`.

    The substring rule is DeepSpeed-Chat's: it lets a local mirror such as
    "/data/hf/Dahoas/rm-static" resolve to the Dahoas/rm-static adapter. The longest contained
    name wins so that the match never depends on dict order.
    """
    if name in HUB_DATASETS:
        return HUB_DATASETS[name]
    contained = [key for key in HUB_DATASETS if key in name]
    return HUB_DATASETS[max(contained, key=len)] if contained else None


def _default_loader(source: str, config: str | None = None) -> Any:
    """`datasets.load_dataset`, plus `load_from_disk` for a folder written by `save_to_disk`."""
    try:
        import datasets  # lazy: only a real hub download needs it
    except ImportError as exc:
        raise UserError("The 'datasets' package is needed to load hub datasets: "
                        "`pip install datasets`, or use a local file path instead.") from exc
    if os.path.isfile(os.path.join(source, "dataset_dict.json")):
        return datasets.load_from_disk(source)
    if config is None:
        return datasets.load_dataset(source)
    return datasets.load_dataset(source, config)


def _load_raw(name: str, spec: HubSpec, loader: Loader | None) -> Mapping[str, Any]:
    """Call the loader; any failure becomes a UserError that says what to check."""
    # A local mirror path is loaded from where it is; a bare name goes to the hub.
    source = name if name != spec.name and os.path.exists(name) else spec.hub_name
    load = loader or _default_loader
    try:
        return load(source) if spec.config is None else load(source, spec.config)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the loader's errors are many and library-specific
        reason = (str(exc).splitlines() or [""])[0][:200]  # the first line says it; the rest can be pages
        raise UserError(
            f"Could not load hub dataset '{name}' (from '{source}'): {type(exc).__name__}: {reason}. "
            "Check the dataset name and your network connection (or the HF cache for offline "
            "use), or pass a local file path (.jsonl/.json) instead.") from exc


def scalar_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The raw row's fields other than `prompt` whose values are strings, numbers, booleans or None: the
    columns a hub row gives the reward functions. Nested fields are left out: some are large (the miracl
    sets carry an embedding per passage) and the adapter has already read what the row means."""
    return {str(k): v for k, v in raw.items()
            if k != "prompt" and (v is None or isinstance(v, (str, int, float, bool)))}


def _adapt_all(spec: HubSpec, raw_rows: Iterable[Mapping[str, Any]], keep_columns: bool = False
               ) -> tuple[list[Row], int]:
    """Usable rows in order (with their scalar fields as columns if `keep_columns`), and how many raw
    rows were skipped as unusable."""
    rows: list[Row] = []
    skipped = 0
    for raw in raw_rows:
        row = spec.adapt(raw) if isinstance(raw, Mapping) else None
        if row is None:
            skipped += 1
        else:
            rows.append(dataclasses.replace(row, columns=scalar_fields(raw)) if keep_columns else row)
    return rows, skipped


def _split(raw: Mapping[str, Any], split: str, name: str) -> Any:
    """`raw[split]`, or a UserError listing the splits the dataset does have."""
    if split not in raw:
        raise UserError(f"Hub dataset '{name}' has no '{split}' split (found: "
                        f"{', '.join(map(str, raw)) or 'none'}); check that the name or local "
                        "mirror path points at the right dataset.")
    return raw[split]


def load_hub_dataset(name: str, seed: int, loader: Loader | None = None, *,
                     keep_columns: bool = False) -> tuple[list[Row], list[Row]]:
    """Load a DeepSpeed-Chat-named hub dataset as (train_rows, eval_rows).

    `loader(hub_name[, config])` must return a mapping split -> iterable of dict rows; it defaults
    to `datasets.load_dataset`. Where the dataset has no eval split, a seeded 10% of train is held
    out. Unusable rows are skipped and counted in a warning; a dataset with no usable train row at
    all is a UserError, since training on nothing would only fail later and less clearly.
    `keep_columns` (step 3): each row keeps the raw row's scalar fields as columns (`scalar_fields`).
    """
    spec = find_hub_dataset(name)
    if spec is None:
        raise UserError(f"Unknown hub dataset '{name}'. Known names: {', '.join(HUB_DATASETS)}; "
                        "or pass a local file path (.jsonl/.json) instead.")
    raw = _load_raw(name, spec, loader)
    train, skipped = _adapt_all(spec, _split(raw, spec.train_split, name), keep_columns)
    if spec.eval_split is not None and spec.eval_split in raw:
        eval_rows, eval_skipped = _adapt_all(spec, raw[spec.eval_split], keep_columns)
        skipped += eval_skipped
    else:
        if spec.eval_split is not None:  # e.g. a partial local mirror: fall back, but say so
            logger.warning("Hub dataset '%s' has no '%s' split; holding out %d%% of '%s' as eval.",
                           name, spec.eval_split, round(EVAL_FRACTION * 100), spec.train_split)
        train, eval_rows = carve_eval(train, seed)
    if skipped:
        logger.warning("Hub dataset '%s': skipped %d unusable row(s) (empty or missing "
                       "prompt/answer fields).", name, skipped)
    if not train:
        raise UserError(f"Hub dataset '{name}' has no usable training rows; check that the name "
                        "or local mirror path points at the right dataset and columns.")
    return train, eval_rows
