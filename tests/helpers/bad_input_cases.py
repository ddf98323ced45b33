"""The bad inputs every step must refuse cleanly, and a runner that feeds them all to the step mains in one
Python process (a subprocess per case would cost 6-10 s of imports each), but for the few start-up cases
that need a process of their own (`START_UP`).

Each `Case` is one user error: what the user did (`problem`), the flags that do it (`args`), and two
fragments of the short message the steps must print: `message` names the problem, `fix` the way out.
`tests/smoke/test_bad_input.py` runs every case on every step it lists and asserts: exit status 2, both
fragments (and `names`, where given) in one `error: ...` line (a configuration error: its header and one
line per problem), no traceback, and nothing in the case's folder created, changed or removed (`leaves`
names the one exception: a complete data cache). docs/errors.md holds `errors_table()`; a test keeps the
two equal.

    python -m tests.helpers.bad_input_cases WORKDIR RESULTS.json [CASE_ID ...]

runs the cases (all, or the ids given) and writes {case id: result} to RESULTS.json. Run it with
HF_HUB_OFFLINE=1 and RLHF_ENGINE_CACHE set, as tests/conftest.py's `offline_env` does.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPO = 4  # step2_dpo/main.py, the DPO alternative to steps 2 + 3 (step 2's data and steps 1-2's model flags)
STEPS = {1: "step1_sft.main", 2: "step2_reward.main", 3: "step3_rlhf.main", DPO: "step2_dpo.main"}
ALL, PAIRS = (1, 2, 3), (1, 2)  # PAIRS: steps 1 and 2, which share the data and model flags
LABELS = {1: "1", 2: "2", 3: "3", DPO: "DPO"}  # in docs/errors.md


@dataclass(frozen=True)
class Ctx:
    """What a case's `args` builds on: its own empty folder, and step 3's actor and critic folders."""

    dir: Path
    actor: Path
    critic: Path

    @property
    def out(self) -> Path:
        """The --output_dir every case gets unless its args give another (it does not exist yet)."""
        return self.dir / "out"

    def write(self, name: str, content: str | bytes) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)


class Skip(Exception):
    """Raised by a case's `args` when the case cannot be checked here (its message says why)."""


@dataclass(frozen=True)
class Case:
    name: str                               # short id; with the step, the test id (`malformed-jsonl-step1`)
    problem: str                            # what the user did, for docs/errors.md
    steps: tuple[int, ...]
    args: Callable[[Ctx, int], list[str]]   # (ctx, step) -> the flags that do it
    message: str                            # fragment of the message that names the problem
    fix: str                                # fragment of the message that names the fix
    leaves: str = ""                        # "data_cache": found after the data is tokenized, so the
                                            # complete tokenized cache stays in <out>/data_cache
    names: str = ""                         # a further fragment the message holds (the flag it names)
    env: Callable[[Ctx], dict[str, str]] | None = None  # the environment it needs, for a case that must
                                            # start a process of its own: it runs as a real subprocess


# ----------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------
def row(i: int, **fields: object) -> dict:
    """A usable step-1/2/3 row (prompt, chosen, rejected), with `fields` changed."""
    return {"prompt": f" Human: sort {i} 1 Assistant:", "chosen": f" 1 {i}", "rejected": f" {i} 1"} | fields


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [row(i) for i in range(2, 12)]


def data(name: str, content: str | bytes) -> Callable[[Ctx, int], list[str]]:
    """args that write `content` to <case dir>/<name> and pass it as --data_path."""
    return lambda c, step: ["--data_path", c.write(name, content)]


def bad_row(**fields: object) -> Callable[[Ctx, int], list[str]]:
    """args with a .jsonl whose second line is a good row with `fields` changed (None: removed)."""
    def build(c: Ctx, step: int) -> list[str]:
        bad = {k: v for k, v in row(1, **fields).items() if v is not None}
        return ["--data_path", c.write("data.jsonl", jsonl([GOOD[0], bad] + GOOD[1:]))]
    return build


def truncated_parquet(c: Ctx, step: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.dir / "data.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    return ["--data_path", str(path)]


def folder_without_train(c: Ctx, step: int) -> list[str]:
    c.write("data/eval.jsonl", jsonl(GOOD))
    return ["--data_path", str(c.dir / "data")]


def too_long(c: Ctx, step: int) -> list[str]:
    flags = ["--max_prompt_seq_len", "3"] if step == 3 else ["--max_seq_len", "4", "--overlength", "drop"]
    return ["--data_path", c.write("data.jsonl", jsonl(GOOD))] + flags


def empty_slice(c: Ctx, step: int) -> list[str]:
    split = {1: "0,1,1", 2: "1,0,1", 3: "1,1,0", DPO: "1,0,1"}[step]
    return ["--data_path", c.write("data.jsonl", jsonl(GOOD)), "--data_split", split]


def ptx(name: str, content: str | None) -> Callable[[Ctx, int], list[str]]:
    def build(c: Ctx, step: int) -> list[str]:
        path = c.write(name, content) if content is not None else str(c.dir / name)
        return ["--unsupervised_dataset_name", path]
    return build


# ----------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------
def model_flag(step: int, role: str = "actor") -> str:
    return f"--{role}_model_name_or_path" if step == 3 else "--model_name_or_path"


def hub_shaped_missing(c: Ctx) -> str:
    """`<a folder of the working directory>/no-such-model` (the runner's working directory: the repository)."""
    here = next((p.name for p in sorted(Path.cwd().iterdir()) if p.is_dir() and not p.name.startswith(".")), None)
    if here is None:
        raise Skip("the working directory has no folder to name a path under")
    return f"{here}/no-such-model"


def model(build_folder: Callable[[Ctx], str], role: str = "actor") -> Callable[[Ctx, int], list[str]]:
    return lambda c, step: [model_flag(step, role), build_folder(c)]


def copy_of_actor(c: Ctx, drop: tuple[str, ...] = (), config: str | None = None) -> str:
    """A copy of the built-in model folder without the files named in `drop`, or with another config.json."""
    import shutil

    folder = c.dir / "model"
    shutil.copytree(c.actor, folder)
    for name in drop:
        (folder / name).unlink()
    if config is not None:
        (folder / "config.json").write_text(config)
    return str(folder)


def folder_without_config(c: Ctx) -> str:
    c.write("model/README.md", "a model card, but no model")
    return str(c.dir / "model")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------
def output_is_a_file(c: Ctx, step: int) -> list[str]:
    return ["--output_dir", c.write("a_file", "keep me")]


def output_under_a_file(c: Ctx, step: int) -> list[str]:
    return ["--output_dir", str(Path(c.write("a_file", "keep me")) / "out")]


def output_read_only(c: Ctx, step: int) -> list[str]:
    parent = c.dir / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    if os.access(parent, os.W_OK):  # root, or a file system that ignores the mode
        parent.chmod(0o700)
        raise Skip("this user can write in a mode-0500 folder (root?), so there is no permission error to see")
    return ["--output_dir", str(parent / "out")]


def cache_is_a_file(c: Ctx, step: int) -> list[str]:
    return ["--data_output_path", c.write("a_file", "keep me")]


def ds_config(content: str) -> Callable[[Ctx, int], list[str]]:
    return lambda c, step: ["--deepspeed_config", c.write("ds.json", content)]


def yaml_config(content: str) -> Callable[[Ctx, int], list[str]]:
    return lambda c, step: ["--config", c.write("cfg.yaml", content)]


def flags(*args: str) -> Callable[[Ctx, int], list[str]]:
    return lambda c, step: list(args)


def per_step(**by_step: list[str]) -> Callable[[Ctx, int], list[str]]:
    """Different flags per step: per_step(s1=[...], s3=[...]); s2 defaults to s1."""
    return lambda c, step: by_step.get(f"s{step}", by_step.get("s1", []))


CASES: list[Case] = [
    # --- where the data comes from
    Case("missing-data-file", "--data_path names a file that does not exist", (*ALL, DPO),
         lambda c, step: ["--data_path", str(c.dir / "nope.jsonl")],
         "not a file, folder or known dataset name (the file does not exist)", "give a .jsonl/.json/.parquet file"),
    Case("unknown-dataset-name", "--data_path is neither a file, a folder nor a known hub dataset", ALL,
         flags("--data_path", "acme/no-such-dataset"), "not a file, folder or known dataset name",
         "a DeepSpeed-Chat dataset name such as Dahoas/rm-static"),
    Case("hub-dataset-unreachable", "a known hub dataset, with no network (or no such file in the HF cache)", (1,),
         flags("--data_path", "Dahoas/rm-static"), "Could not load hub dataset 'Dahoas/rm-static'",
         "pass a local file path"),
    Case("folder-without-train-file", "--data_path is a folder with no train.jsonl/.json/.parquet", (1,),
         folder_without_train, "no train.jsonl, train.json or train.parquet", "add one, or give a file"),
    Case("unsupported-file-type", "a .csv (or other) file: only .jsonl, .json and .parquet are read", (1,),
         data("data.csv", "prompt,chosen\n\"a,b\n"), "unsupported file type", "use .jsonl, .json or .parquet"),
    # --- malformed files
    Case("malformed-jsonl-line", "a .jsonl line that is not JSON", (*ALL, DPO),
         data("data.jsonl", jsonl(GOOD[:1]) + '{"prompt": oops}\n' + jsonl(GOOD[1:])),
         "data.jsonl:2: malformed JSON", "fix or remove that line"),
    Case("malformed-json-file", "a .json file that is not JSON", ALL,
         data("data.json", '[\n{"prompt": " Human: a Assistant:", "chosen": " b"},\n{"prompt": \n]'),
         "data.json:4: malformed JSON", "fix the file"),
    Case("json-not-a-list", "a .json file whose top level is not a list of rows", (1,),
         data("data.json", json.dumps(GOOD[0])), "a .json dataset must be a list of row objects", "or use .jsonl"),
    Case("row-not-an-object", "a row that is not a JSON object", (1,),
         data("data.jsonl", jsonl(GOOD[:1]) + '["a prompt", "an answer"]\n'), "each row must be a JSON object",
         "write each row as {\"prompt\": ..."),
    Case("truncated-parquet", "a damaged or truncated .parquet file", ALL, truncated_parquet,
         "cannot read it as parquet", "re-export the file"),
    Case("non-utf8-jsonl", "a .jsonl file with bytes that are not UTF-8 (e.g. Latin-1)", ALL,
         data("data.jsonl", jsonl(GOOD[:1]).encode() + b'{"prompt": " caf\xe9", "chosen": " a"}\n'),
         "data.jsonl:2: not UTF-8 text", "re-encode the file as UTF-8"),
    Case("non-utf8-json", "a .json file with bytes that are not UTF-8", (1,),
         data("data.json", b'[{"prompt": " caf\xe9", "chosen": " a"}]'), "not UTF-8 text",
         "re-encode the file as UTF-8"),
    Case("empty-file", "an empty data file (zero rows)", ALL, data("data.jsonl", ""), "the file holds no rows",
         "add rows or drop it from --data_path"),
    Case("empty-json-list", "a .json file holding an empty list", (1,), data("data.json", "[]"),
         "the file holds no rows", "add rows or drop it from --data_path"),
    # --- wrong schema
    Case("no-answer-field", "rows without 'chosen' or 'response'", PAIRS, bad_row(chosen=None, rejected=None),
         "data.jsonl:2: no answer field", "rows need 'chosen' or 'response'"),
    Case("missing-prompt", "rows without 'prompt'", ALL, bad_row(prompt=None), "data.jsonl:2: missing field 'prompt'",
         "rows need prompt + chosen"),
    Case("prompt-field-named-otherwise", "step-3 rows whose prompt field has another name (GSM8K's 'question')",
         (3,), data("data.jsonl", jsonl([{"question": f" Human: sort {i} 1 Assistant:", "answer": "#### 1"}
                                         for i in range(2, 12)])),
         "data.jsonl:1: missing field 'prompt' (fields: question, answer)",
         "--prompt_column_map, e.g. question=prompt"),
    Case("column-named-completions", "a step-3 field named like a reward-function argument", (3,),
         data("data.jsonl", jsonl([row(i, completions="x") for i in range(2, 12)])),
         "a field named 'completions'", "rename it with --prompt_column_map completions=<another name>"),
    Case("no-rejected-answers", "step 2 data without 'rejected' (SFT-only data)", (2, DPO),
         data("data.jsonl", jsonl([row(i, rejected=None) for i in range(20)])), "no usable train preference pairs",
         "rows need a 'rejected' answer that differs from 'chosen'"),
    Case("identical-pairs", "step 2 data whose chosen and rejected are the same", (2, DPO),
         data("data.jsonl", jsonl([row(i, rejected=f" 1 {i}") for i in range(20)])),
         "no usable train preference pairs", "rows need a 'rejected' answer that differs from 'chosen'"),
    Case("number-field", "a number where text is expected", ALL, bad_row(prompt=5),
         "data.jsonl:2: field 'prompt' must be a string, not int", "write it as a JSON string"),
    Case("list-field", "a list where text is expected", PAIRS, bad_row(chosen=["a", "b"]),
         "field 'chosen' must be a string, not list", "write it as a JSON string"),
    Case("bad-messages", "'messages' that is not a list of {role, content} objects", (1,),
         data("data.jsonl", jsonl([{"messages": "hello"}])), "'messages' must be a list of at least two",
         'write it as [{"role": "user"'),
    Case("empty-field", "an empty field", ALL, bad_row(chosen="", prompt=""), "data.jsonl:2: field 'prompt' is empty",
         "remove the row or fill it in"),
    Case("whitespace-field", "a field of spaces, tabs or newlines only", ALL, bad_row(chosen=" \t\n"),
         "data.jsonl:2: field 'chosen' is empty", "remove the row or fill it in"),
    # --- rows filtered out
    Case("every-row-too-long", "every row over --max_seq_len with --overlength drop", PAIRS, too_long,
         "no usable train", "raise the limit"),
    Case("every-prompt-too-long", "every prompt over --max_prompt_seq_len (longer prompts are dropped, as "
         "DeepSpeed-Chat does)", (3,), too_long, "fits --max_prompt_seq_len 3", "raise the limit"),
    Case("empty-data-slice", "--data_split gives the step no rows", (*ALL, DPO), empty_slice,
         "gives step", "a larger share"),
    Case("ptx-missing-file", "--unsupervised_dataset_name names a file that does not exist", (3,),
         ptx("nope.txt", None), "no such file or folder", "give a .txt/.jsonl/.json/.parquet file"),
    Case("ptx-too-little-text", "PTX text too short for one block of prompt + answer tokens", (3,),
         ptx("ptx.txt", "just a few words\n"), "make no full block", "give more text", leaves="data_cache"),
    # --- model folders
    Case("missing-model-folder", "the model folder does not exist", (*PAIRS, DPO),
         model(lambda c: str(c.dir / "no-model")), "no such model folder", "give a Hugging Face model folder"),
    Case("missing-actor-folder", "step 3's actor folder does not exist", (3,),
         model(lambda c: str(c.dir / "no-model")), "no such model folder", "run step 1 first",
         names="--actor_model_name_or_path"),
    Case("missing-critic-folder", "step 3's critic folder does not exist", (3,),
         model(lambda c: str(c.dir / "no-model"), "critic"), "no such model folder", "run step 2 first",
         names="--critic_model_name_or_path"),
    Case("hub-shaped-missing-folder", "a missing path shaped like a hub name (owner/name) whose first folder is "
         "here, as output/nope", PAIRS, model(hub_shaped_missing), "no such model folder",
         "give a Hugging Face model folder"),
    Case("hub-shaped-missing-actor-folder", "step 3's actor path, missing and shaped like a hub name (output/nope)",
         (3,), model(hub_shaped_missing), "no such model folder", "run step 1 first",
         names="--actor_model_name_or_path (the actor model)"),
    Case("uncached-hub-model-offline", "a hub model name the Hugging Face cache lacks, with HF_HUB_OFFLINE=1 (or "
         "TRANSFORMERS_OFFLINE=1)", ALL, model(lambda c: "acme/uncached-model"), "offline mode is on",
         "unset HF_HUB_OFFLINE to download it once"),
    Case("model-path-is-a-file", "the model path is a file, not a folder", ALL,
         model(lambda c: c.write("model.bin", "x")), "is a file, not a model folder",
         "point at the folder holding config.json"),
    Case("folder-without-config", "a model folder without config.json", ALL,
         model(folder_without_config), "the folder has no config.json",
         "point at the folder holding config.json"),
    Case("config-without-weights", "a model folder with config.json but no weights", ALL,
         model(lambda c: copy_of_actor(c, drop=("model.safetensors",))), "has no weights",
         "copy the complete model folder"),
    Case("malformed-model-config", "a model folder whose config.json is not valid JSON", (1,),
         model(lambda c: copy_of_actor(c, config="{not json")), "cannot load the model folder",
         "check that it is a complete Hugging Face model folder"),
    Case("model-without-tokenizer", "a model folder without tokenizer files", (1,),
         model(lambda c: copy_of_actor(c, drop=TOKENIZER_FILES)), "has no tokenizer",
         "save the tokenizer into the model folder"),
    Case("unknown-hub-model", "a model name that is not on the hub (or no network)", (1,),
         flags("--model_name_or_path", "acme/no-such-model"), "cannot load 'acme/no-such-model'",
         "pass a local model folder"),
    Case("critic-is-not-a-reward-model", "step 3's critic folder holds a causal LM (a step-1 output)", (3,),
         lambda c, step: ["--critic_model_name_or_path", str(c.actor)], "is not a reward model",
         "pass the folder step 2 wrote"),
    Case("actor-is-a-reward-model", "step 3's actor folder holds a reward model (a step-2 output)", (3,),
         lambda c, step: ["--actor_model_name_or_path", str(c.critic)], "is a reward model, not a causal LM",
         "pass the folder step 1 wrote"),
    Case("longer-than-the-context", "--max_prompt_seq_len + --max_answer_seq_len beyond the actor's positions", (3,),
         flags("--max_prompt_seq_len", "400", "--max_answer_seq_len", "200"),
         "exceeds the actor's context of 512 tokens", "lower them"),
    # --- flags
    Case("unknown-flag", "a flag the step does not have", (*ALL, DPO), flags("--not_a_flag", "1"),
         "unknown flag(s) --not_a_flag", "see --help"),
    Case("bad-flag-value", "a flag value of the wrong type", (1,), flags("--learning_rate", "fast"),
         "argument --learning_rate: invalid float value: 'fast'", "see --help"),
    Case("bad-choice", "a value outside a flag's choices", (1,), flags("--zero_stage", "5"),
         "argument --zero_stage: invalid choice", "see --help"),
    Case("offload-below-zero-2", "--offload below ZeRO-2 (DeepSpeed would ignore it)", (*ALL, DPO),
         per_step(s1=["--offload", "--zero_stage", "1"], s3=["--offload", "--actor_zero_stage", "1"]),
         "--offload needs", "DeepSpeed ignores offload below stage 2"),
    Case("offload-reference-below-zero-3", "--offload_reference_model without a ZeRO-3 actor", (3,),
         flags("--offload_reference_model"), "--offload_reference_model needs --actor_zero_stage 3",
         "DeepSpeed offloads parameters only under ZeRO-3"),
    Case("dpo-offload-reference-below-zero-3", "DPO's --offload_reference_model without ZeRO-3", (DPO,),
         flags("--offload_reference_model"), "--offload_reference_model needs --zero_stage 3",
         "DeepSpeed offloads parameters only under ZeRO-3"),
    Case("dpo-adapters-off-without-frozen-lora", "DPO's reference as the policy without adapters, but no frozen "
         "LoRA base", (DPO,), flags("--reference_model", "adapters_off"),
         "--reference_model adapters_off needs --lora_dim > 0 and --only_optimize_lora", "--reference_model copy"),
    Case("dpo-label-smoothing-out-of-range", "DPO's --label_smoothing outside [0, 0.5)", (DPO,),
         flags("--label_smoothing", "0.5"), "--label_smoothing must be in [0, 0.5)",
         "give the chance that a label is wrong"),
    Case("dpo-label-smoothing-without-meaning", "--label_smoothing with a DPO loss that has no label noise (ipo, "
         "hinge)", (DPO,), flags("--dpo_loss", "ipo", "--label_smoothing", "0.1"),
         "--label_smoothing has no meaning for --dpo_loss ipo", "use sigmoid, robust or simpo"),
    Case("dpo-precompute-without-reference", "--precompute_ref_logps with the reference-free SimPO loss", (DPO,),
         flags("--dpo_loss", "simpo", "--precompute_ref_logps"), "--precompute_ref_logps has nothing to compute",
         "drop it"),
    Case("offload-reward-below-zero-3", "--offload_reward_model without a ZeRO-3 critic", (3,),
         flags("--offload_reward_model"), "--offload_reward_model needs --critic_zero_stage 3",
         "DeepSpeed offloads parameters only under ZeRO-3"),
    Case("only-optimize-lora-without-lora", "--only_optimize_lora without a LoRA rank", (*ALL, DPO),
         flags("--only_optimize_lora"), "--only_optimize_lora needs", "lora_dim"),
    Case("save-total-limit-without-interval", "--save_total_limit without --save_interval", ALL,
         flags("--save_total_limit", "2"), "--save_total_limit needs --save_interval > 0",
         "no checkpoints are written without it"),
    Case("test-mode-without-stop-step", "--enable_test_mode without --test_stop_step", (3,),
         flags("--enable_test_mode", "--test_stop_step", "0"), "--enable_test_mode needs --test_stop_step > 0",
         "the PPO step to stop after"),
    Case("generation-training-batch-mismatch", "a generation batch that is not a multiple of the training batch", (3,),
         flags("--per_device_generation_batch_size", "3", "--per_device_training_batch_size", "2"),
         "--per_device_generation_batch_size 3 must be a multiple of --per_device_training_batch_size 2",
         "each generation batch is cut into PPO micro-batches"),
    Case("group-of-one", "a group estimator with one answer per prompt", (3,),
         flags("--advantage_estimator", "grpo"), "--advantage_estimator grpo compares the answers of one prompt",
         "set --n_samples_per_prompt 2 or more"),
    Case("groups-do-not-fill-micro-batches", "answers per generation batch that micro-batches cannot divide", (3,),
         flags("--advantage_estimator", "grpo", "--n_samples_per_prompt", "3", "--per_device_generation_batch_size",
               "2", "--per_device_training_batch_size", "4"),
         "= 6 answers per rank, which --per_device_training_batch_size 4 does not divide", "use one of 1, 2, 3, 6"),
    Case("unknown-reward-function", "a --reward_funcs reference to a function that does not exist", (3,),
         flags("--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--reward_funcs",
               "engine.rewards.builtin:no_such_rule"),
         "engine.rewards.builtin has no 'no_such_rule'", "fix the name after the ':'"),
    Case("reward-function-file-missing", "a --reward_funcs file that does not exist", (3,),
         flags("--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--reward_funcs",
               "missing/rewards.py:score"), "no file missing/rewards.py", "with a path that exists"),
    Case("negative-lora-dim", "a negative LoRA rank", ALL,
         per_step(s1=["--lora_dim", "-2"], s3=["--actor_lora_dim", "-2"]), "lora_dim must be >= 0",
         "0 disables LoRA"),
    Case("dropout-out-of-range", "a dropout probability outside [0, 1)", (1,), flags("--dropout", "1.5"),
         "--dropout must be in [0, 1) (got 1.5)", "[0, 1)"),
    Case("zero-batch-size", "a batch size of 0", PAIRS, flags("--per_device_train_batch_size", "0"),
         "--per_device_train_batch_size must be >= 1", ">= 1"),
    Case("bad-data-split", "--data_split without three weights", ALL, flags("--data_split", "1,2"),
         "--data_split '1,2'", "e.g. 2,4,4"),
    Case("bad-prompt-column-map", "a --prompt_column_map entry that is not field=name", (3,),
         flags("--prompt_column_map", "question"), "--prompt_column_map 'question': 'question' is not field=name",
         "such as question=prompt,answer=answer"),
    Case("gamma-out-of-range", "a PPO coefficient out of range", (3,), flags("--gamma", "2"),
         "--gamma and --lam must be in [0, 1]", "[0, 1]"),
    Case("step1-flag-in-step-2", "a step-1-only flag given to step 2 (step 2 does not have it)", (2,),
         flags("--train_on_prompt"), "unknown flag(s) --train_on_prompt", "see --help"),
    Case("malformed-yaml-config", "a --config file that is not valid YAML", ALL, yaml_config("zero_stage: [1\n"),
         "is not valid YAML", "fix the file"),
    Case("unknown-yaml-key", "a --config key that is not a flag", (1,), yaml_config("zero_stages: 1\n"),
         "unknown key(s) zero_stages", "keys are flag names"),
    Case("deepspeed-config-missing", "--deepspeed_config names a file that does not exist", (1,),
         lambda c, step: ["--deepspeed_config", str(c.dir / "ds.json")], "no such file",
         "give a DeepSpeed JSON file"),
    Case("deepspeed-config-is-a-folder", "--deepspeed_config names a folder", (1,),
         lambda c, step: ["--deepspeed_config", str(c.dir)], "is a folder", "give a DeepSpeed JSON file"),
    Case("deepspeed-config-not-json", "a --deepspeed_config file that is not valid JSON", ALL, ds_config("{zero: 3"),
         "cannot read it as JSON", "fix the file"),
    Case("deepspeed-config-not-an-object", "a --deepspeed_config whose top level is not a JSON object", (1,),
         ds_config("[1, 2]"), "the top level must be a JSON object", "see ds_configs/"),
    Case("deepspeed-config-contradicts-flags", "a --deepspeed_config value that contradicts the flags", ALL,
         ds_config('{"zero_optimization": {"stage": 3}}'), "zero_optimization.stage = 3 contradicts the flags",
         "set it to \"auto\" or pass the matching flag"),
    # --- output
    Case("output-dir-is-a-file", "--output_dir is a file", (*ALL, DPO), output_is_a_file, "is a file",
         "give a folder path"),
    Case("output-dir-under-a-file", "--output_dir lies inside a file's path", (1,), output_under_a_file,
         "is a file, not a folder", "give a folder path"),
    Case("output-dir-read-only", "--output_dir where the user may not write", ALL, output_read_only,
         "no permission to write in", "choose a folder you can write to"),
    Case("data-cache-is-a-file", "--data_output_path (the tokenized-data cache) is a file", ALL, cache_is_a_file,
         "--data_output_path", "give a folder path"),
    Case("resume-without-checkpoint", "--resume with no checkpoint in --output_dir", (*ALL, DPO), flags("--resume"),
         "--resume: no checkpoint in", "run without --resume"),
]


def case_id(case: Case, step: int) -> str:
    return f"{case.name}-" + ("dpo" if step == DPO else f"step{step}")


def case_ids() -> list[str]:
    return [case_id(case, step) for case in CASES for step in case.steps]


def cases_by_id() -> dict[str, tuple[Case, int]]:
    return {case_id(case, step): (case, step) for case in CASES for step in case.steps}


def errors_table() -> str:
    """The Markdown table of docs/errors.md (a test keeps the two equal)."""
    lines = ["| input problem | steps | message (names the problem) | fix (in the message) | case |",
             "|---|---|---|---|---|"]
    for case in CASES:
        cells = [case.problem, ", ".join(LABELS[step] for step in case.steps), f"`{case.message}`", f"`{case.fix}`",
                 f"`{case.name}`" + (" (*)" if case.leaves else "")]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


_HELD: list = []  # sockets that play another job's, open until the runner exits


def busy_port(c: Ctx) -> dict[str, str]:
    """The environment a launcher gives rank 0, with a MASTER_PORT another process listens on."""
    import socket

    other_job = socket.socket()
    other_job.bind(("127.0.0.1", 0))
    other_job.listen()
    _HELD.append(other_job)
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(other_job.getsockname()[1])}


def stale_build_lock(c: Ctx) -> dict[str, str]:
    """A TORCH_EXTENSIONS_DIR of the user's own (beside the case's folder) with the lock a killed op build leaves."""
    from tests.helpers.op_locks import leave_stale_lock

    ops = c.dir.with_name(c.dir.name + "-ops")
    leave_stale_lock(ops / "deepspeed_shm_comm" / "lock")
    return {"TORCH_EXTENSIONS_DIR": str(ops)}


START_UP = [
    Case("port-in-use", "the rendezvous port (MASTER_PORT, deepspeed/torchrun --master_port) is taken, e.g. by "
         "another job", ALL, flags(), "(MASTER_PORT, the rendezvous port) is in use on this machine",
         "pick a free one: deepspeed --master_port", env=busy_port),
    Case("stale-op-build-lock", "a DeepSpeed op build stopped part-way (SIGTERM) left its lock in a "
         "TORCH_EXTENSIONS_DIR the user set (in the engine's own cache it is removed, with a line)", (1,), flags(),
         "is a lock left by a DeepSpeed op build that stopped part-way", "remove it: rm ", env=stale_build_lock),
]
CASES += START_UP


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------
def base_args(step: int, ctx: Ctx) -> list[str]:
    """Small settings under every case, so a case that wrongly passes validation ends after a step."""
    args = ["--disable_tqdm", "--output_dir", str(ctx.out), "--test_stop_step", "1"]
    if step == 3:
        return args + ["--actor_model_name_or_path", str(ctx.actor), "--critic_model_name_or_path", str(ctx.critic),
                       "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--per_device_generation_batch_size",
                       "2", "--per_device_training_batch_size", "2", "--num_warmup_steps", "0"]
    return args + ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2"]


def snapshot(root: Path) -> dict[str, list]:
    """Every path under `root` with its size, mode and mtime: the state a failing run must not change."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = [st.st_size if path.is_file() else -1, st.st_mode, st.st_mtime_ns]
    return out


def run_case(case: Case, step: int, ctx: Ctx, main: Callable) -> dict:
    """Call the step's main through `run_main` as `python stepN/main.py ...` would (a case with `env`: run that
    command, in a process of its own); report what happened."""
    import io
    import time


    ctx.dir.mkdir(parents=True)
    try:
        argv = base_args(step, ctx) + case.args(ctx, step)
    except Skip as skip:
        return {"skipped": str(skip)}
    env = case.env(ctx) if case.env is not None else None
    before = snapshot(ctx.dir)
    err = io.StringIO()
    start = time.perf_counter()
    tb = ""
    if env is not None:
        code, stderr = run_process(step, argv, env)
        err.write(stderr)
    else:
        code, tb = run_in_process(main, argv, err)
    seconds = time.perf_counter() - start
    for folder in [ctx.dir, *ctx.dir.rglob("*")]:  # undo a case's chmod so the folder can be removed
        if folder.is_dir() and not folder.stat().st_mode & 0o200:
            folder.chmod(0o700)
    after = snapshot(ctx.dir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    broken_caches = [k for k in changed if k.endswith(".safetensors") and not _complete_safetensors(ctx.dir / k)]
    stderr = err.getvalue() + tb
    message = stderr.rsplit("error: ", 1)[1].rstrip("\n") if "error: " in stderr else ""
    return {"argv": argv, "dir": str(ctx.dir), "exit": code, "stderr": stderr[-4000:], "message": message,
            "traceback": bool(tb) or "Traceback" in stderr, "changed": changed, "broken_caches": broken_caches,
            "seconds": round(seconds, 3)}


def run_in_process(main: Callable, argv: list[str], err: Any) -> tuple[int, str]:
    """(exit status, traceback or "") of `run_main(main, argv)`, its stderr written to `err`."""
    import contextlib
    import io
    import traceback

    from engine.runtime.entry import run_main

    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_main(main, argv)
            return 0, ""
        except SystemExit as exit_:
            return exit_.code, ""
        except BaseException:  # noqa: BLE001 - a bug in the engine: report it as the traceback it would print
            return 1, traceback.format_exc()


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_process(step: int, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """(exit status, stderr) of `python stepN/main.py argv` with `env` added to this process's environment."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / STEPS[step].replace(".", "/")
    # Not the runner's own process group (the in-process cases set RANK, MASTER_PORT, ...): a fresh launch.
    fresh = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([sys.executable, f"{script}.py", *argv], env=fresh | env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stderr


def _complete_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any failure to open means the file is not a complete cache
        return False


def main(argv: list[str]) -> None:
    import importlib
    import logging

    from tests.conftest import tiny_model_folder, tiny_reward_folder

    work, results_path, wanted = Path(argv[0]), Path(argv[1]), set(argv[2:])
    cache = Path(os.environ["RLHF_ENGINE_CACHE"])
    actor = tiny_model_folder(cache)
    critic = work / "models" / "critic"
    if not (critic / "config.json").is_file():
        tiny_reward_folder(cache, critic)
    mains = {step: importlib.import_module(module).main for step, module in STEPS.items()}
    results = {}
    for case_id, (case, step) in cases_by_id().items():
        if wanted and case_id not in wanted:
            continue
        results[case_id] = run_case(case, step, Ctx(work / case_id, actor, critic), mains[step])
        logging.getLogger().handlers.clear()  # the steps' logging set-up wrote to this case's captured stderr
        print(f"{case_id}: exit {results[case_id].get('exit')} in {results[case_id].get('seconds')} s", flush=True)
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
