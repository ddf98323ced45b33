"""Where rows come from: the bundled task, local files and folders, and DeepSpeed-Chat hub names.

Every source becomes `(train_rows, eval_rows)` of `Row`. Accepted row schemas:
- DeepSpeed-Chat's `prompt`, `chosen`, `rejected` (rejected optional for SFT);
- `prompt` + `response`;
- chat rows: `messages` (a list of {role, content}, the last one the assistant's answer), rendered
  with the tokenizer's chat template when it has one, DeepSpeed-Chat's " Human: ... Assistant:"
  otherwise;
- for step 3 only, `prompt` alone. Step 3's rows keep their other fields as columns for the reward
  functions, after `--prompt_column_map` renamed them (GSM8K: question=prompt).
Local files are read here rather than by `datasets` so a bad line is reported by file and line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.data.rows import EVAL_FRACTION, Row, carve_eval
from engine.data.sort_task import ASSET_DIR as BUNDLED_DIR
from engine.errors import UserError

logger = logging.getLogger("engine")

BUNDLED = "bundled/synthetic_sort"
LOCAL_JSONFILE = "local/jsonfile"
# DeepSpeed-Chat's local/jsonfile reads <DeepSpeed-Chat>/data/{train,eval}.json; ours is the repo root.
LOCAL_JSONFILE_DIR = Path(__file__).resolve().parents[2] / "data"
SUFFIXES = (".jsonl", ".json", ".parquet")
DSCHAT_DEFAULT_DATA = "Dahoas/rm-static"  # DeepSpeed-Chat's --data_path default


def data_sources(data_path: Sequence[str]) -> list[str]:
    """The sources a --data_path means: itself, or the bundled task when it is empty."""
    return list(data_path) or [BUNDLED]


def default_data_note(data_path: Sequence[str]) -> str | None:
    """What an empty --data_path trains on, for the log and config.yaml (None when a path was given)."""
    if data_path:
        return None
    return (f"data: no --data_path, so the bundled synthetic sorting task ({BUNDLED}, {BUNDLED_DIR}) is used; "
            f"DeepSpeed-Chat's default would be {DSCHAT_DEFAULT_DATA}: pass --data_path {DSCHAT_DEFAULT_DATA} for it")


# ----------------------------------------------------------------------------------------------
# Row schemas
# ----------------------------------------------------------------------------------------------
def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise UserError(f"{where}: missing field '{key}'; rows need prompt + chosen (+ rejected), "
                        "prompt + response, or messages")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, not {type(value).__name__}; write it as a JSON "
                        "string")
    if not value.strip():
        raise UserError(f"{where}: field '{key}' is empty; remove the row or fill it in")
    return value


def render_messages(messages: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    """(prompt, answer) of a chat whose last message is the assistant's answer."""
    if (not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise UserError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects; write it as "
                        '[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]')
    if messages[-1]["role"] != "assistant" or not str(messages[-1]["content"]).strip():
        raise UserError(f"{where}: the last message must be a non-empty assistant answer")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        answer = full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"]
        return prompt, answer
    turns = {"user": " Human: ", "assistant": " Assistant: ", "system": " "}
    parts = []
    for m in messages[:-1]:
        if m["role"] not in turns:
            raise UserError(f"{where}: unknown role {m['role']!r}; use system, user or assistant")
        parts.append(turns[m["role"]] + str(m["content"]))
    return "".join(parts) + " Assistant:", " " + str(messages[-1]["content"])


def record_to_row(record: Any, tokenizer: Any, where: str) -> Row:
    if not isinstance(record, dict):
        raise UserError(f"{where}: each row must be a JSON object, not {type(record).__name__}; write each row as "
                        "{\"prompt\": ..., \"chosen\": ...}")
    if "messages" in record:
        prompt, chosen = render_messages(record["messages"], tokenizer, where)
        return Row(prompt, chosen)
    prompt = _text(record, "prompt", where)
    if "chosen" in record:
        rejected = _text(record, "rejected", where) if record.get("rejected") is not None else None
        return Row(prompt, _text(record, "chosen", where), rejected)
    if "response" in record:
        return Row(prompt, _text(record, "response", where))
    raise UserError(f"{where}: no answer field; rows need 'chosen' or 'response' (or use 'messages')")


def rename_fields(record: Any, mapping: Mapping[str, str], where: str) -> Any:
    """`record` with its fields renamed by `mapping` (--prompt_column_map), all at once, so that
    `a=b,b=a` swaps two fields; a renamed field may not land on a field the row keeps."""
    if not mapping or not isinstance(record, dict):
        return record
    for source, target in mapping.items():
        if source in record and target in record and target not in mapping:
            raise UserError(f"{where}: --prompt_column_map renames '{source}' to '{target}', but the row has a "
                            f"'{target}' field too; rename '{target}' as well (e.g. {target}=original_{target})")
    return {mapping.get(k, k): v for k, v in record.items()}


def record_to_prompt_row(record: Any, tokenizer: Any, where: str) -> Row:
    """A step-3 row: the prompt, plus every other field of the record as `columns` (for the reward
    functions). A record with answers is checked as steps 1 and 2 check it; one without needs only a
    prompt (e.g. GSM8K's question and answer, with --prompt_column_map question=prompt)."""
    if isinstance(record, dict) and not any(k in record for k in ("messages", "chosen", "response")):
        if record.get("prompt") is None:
            raise UserError(f"{where}: missing field 'prompt' (fields: {', '.join(map(str, record)) or 'none'}); "
                            "if the prompt has another name, map it with --prompt_column_map, e.g. question=prompt")
        row = Row(_text(record, "prompt", where), "")
    else:
        row = record_to_row(record, tokenizer, where)
    return dataclasses.replace(row, columns={k: v for k, v in record.items() if k != "prompt"})


# ----------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------
def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}); re-encode the "
                        "file as UTF-8") from None


def _records(path: Path) -> Iterable[tuple[str, Any]]:
    """(where, record) for each row of a .jsonl / .json / .parquet file."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, f"{path}:{lineno}")
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg}); fix or remove "
                                    "that line") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(_decode(path.read_bytes(), str(path)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg}); fix the file (a .json dataset is "
                            "one list of row objects; .jsonl takes one object per line)") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json dataset must be a list of row objects (or use .jsonl)")
        for i, rec in enumerate(data):
            yield f"{path}[{i}]", rec
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            reason = (str(err).splitlines() or [""])[0][:200]
            raise UserError(f"{path}: cannot read it as parquet ({type(err).__name__}: {reason}); re-export the file "
                            "(e.g. pandas' to_parquet) or use .jsonl") from None
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}[row {i}]", rec


def read_rows(path: Path, tokenizer: Any, prompt_columns: Mapping[str, str] | None = None) -> list[Row]:
    """The rows of a file. `prompt_columns` None: rows of steps 1 and 2; a mapping (maybe empty): step 3's
    prompt rows, their fields renamed by it (--prompt_column_map) and kept as columns."""
    if prompt_columns is None:
        rows = [record_to_row(rec, tokenizer, where) for where, rec in _records(path)]
    else:
        rows = [record_to_prompt_row(rename_fields(rec, prompt_columns, where), tokenizer, where)
                for where, rec in _records(path)]
    if not rows:
        raise UserError(f"{path}: the file holds no rows; add rows or drop it from --data_path")
    return rows


def _find_split_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def load_folder(folder: Path, tokenizer: Any, seed: int, prompt_columns: Mapping[str, str] | None = None
                ) -> tuple[list[Row], list[Row]]:
    train_file = _find_split_file(folder, ("train",))
    if train_file is None:
        raise UserError(f"{folder}: no train.jsonl, train.json or train.parquet in this folder; add one, or give a "
                        "file as --data_path")
    eval_file = _find_split_file(folder, ("eval", "test", "validation"))
    train = read_rows(train_file, tokenizer, prompt_columns)
    if eval_file is None:
        logger.info("%s has no eval file; holding out a seeded %d%% of train", folder, EVAL_FRACTION * 100)
        return carve_eval(train, seed)
    return train, read_rows(eval_file, tokenizer, prompt_columns)


def load_source(spec: str, tokenizer: Any, seed: int, prompt_columns: Mapping[str, str] | None = None
                ) -> tuple[list[Row], list[Row]]:
    """(train_rows, eval_rows) of one --data_path entry; `prompt_columns` as in `read_rows` (hub sets keep
    their scalar fields as columns and are not renamed: their adapters know their fields)."""
    if spec == BUNDLED:
        return load_folder(BUNDLED_DIR, tokenizer, seed, prompt_columns)
    if spec == LOCAL_JSONFILE:
        if not LOCAL_JSONFILE_DIR.is_dir():
            raise UserError(f"local/jsonfile reads {LOCAL_JSONFILE_DIR}/train.json and eval.json; "
                            "that folder does not exist")
        return load_folder(LOCAL_JSONFILE_DIR, tokenizer, seed, prompt_columns)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(path, tokenizer, seed, prompt_columns)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")
        return carve_eval(read_rows(path, tokenizer, prompt_columns), seed)
    from engine.data.hub import load_hub_dataset

    problem = data_path_problem(spec)
    if problem:
        raise UserError(problem)
    return load_hub_dataset(spec, seed, keep_columns=prompt_columns is not None)


def data_path_problem(spec: str) -> str | None:
    """The error of a --data_path entry that is neither the bundled task, local/jsonfile, an existing file or
    folder nor a known hub dataset name, else None. It reads only the file system, so the steps call it
    before the process group starts (`engine.runtime.run.check_inputs`)."""
    from engine.data.hub import find_hub_dataset

    path = Path(spec).expanduser()
    if spec in (BUNDLED, LOCAL_JSONFILE) or path.exists() or find_hub_dataset(spec) is not None:
        return None
    hint = " (the file does not exist)" if path.suffix in SUFFIXES or "/" not in spec else ""
    return (f"--data_path {spec}: not a file, folder or known dataset name{hint}; give a "
            ".jsonl/.json/.parquet file, a folder with train.* and eval.*, local/jsonfile, "
            "or a DeepSpeed-Chat dataset name such as Dahoas/rm-static")
