"""Compare actors (e.g. SFT vs RLHF vs EMA) on held-out prompts with the reward model (when given) and, where
the prompts have one, the task's rule.

    python step3_rlhf/evaluate.py --models sft=output/step1_sft rlhf=output/step3_rlhf/actor \\
        ema=output/step3_rlhf/actor_ema --reward_model output/step2_reward --output_dir output/eval

Per model: mean reward-model score, win rate against the first model by that score (per prompt; a
tie counts half; both only with --reward_model, e.g. not after a GRPO run with rule rewards), KL to the
reference per answer (default reference: the first model, which is what step 3 starts from and penalises
against), answer-length statistics and, on the bundled sorting task,
the share of answers right by its rule. The prompts are the eval part of --data_path (default: the
bundled task's 400 held-out prompts), which no step trains on. Answers are sampled as step 3's
rollouts are (temperature 1, no top-k or top-p) with one seed for every model, so identical models give
identical answers; --greedy decodes greedily instead.

Writes eval_report.json, eval_report.md (the table) and samples.md (answers side by side) to
--output_dir, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelArgs
from engine.data.sources import BUNDLED, load_source
from engine.errors import UserError
from engine.eval.compare import markdown_samples, markdown_table, run_model, summarize
from engine.helptext import HelpFormatter
from engine.models.inference import check_model_path, load_for_inference, load_reward_for_inference
from engine.models.load import load_tokenizer
from engine.models.reward_model import RewardModel
from engine.runtime.atomic import write_atomically
from engine.runtime.distributed import gpu_wanted
from engine.runtime.entry import run_main
from engine.runtime.run import check_output_dir

logger = logging.getLogger("engine")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                   help="The actors to compare, the baseline first; a bare PATH is named after its folder.")
    p.add_argument("--reward_model", default=None, help="The step-2 folder that scores the answers (default: none; "
                   "then the table has no reward-model score or win rate).")
    p.add_argument("--reference", default=None, help="The model KL is measured against (default: the first).")
    p.add_argument("--data_path", nargs="*", default=[], help="Datasets as in the steps (default: the bundled task).")
    p.add_argument("--eval_prompts", type=int, default=400, help="Held-out prompts to answer (at most).")
    p.add_argument("--samples_per_prompt", type=int, default=4,
                   help="Answers per prompt and model (sampled; more answers, less noise). 1 with --greedy.")
    p.add_argument("--max_prompt_seq_len", type=int, default=32, help="Longer prompts are skipped (step 3's rule).")
    p.add_argument("--max_answer_seq_len", type=int, default=16, help="New tokens per answer (at most).")
    p.add_argument("--greedy", action="store_true", help="Decode greedily instead of sampling.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (step 3's default).")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="Nucleus sampling: keep the smallest token set with this probability mass.")
    p.add_argument("--top_k", type=int, default=0, help="Sample among the k most likely tokens (0: all).")
    p.add_argument("--batch_size", type=int, default=64, help="Answers generated and scored at once.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the sampling (the same for every model) and, as the "
                   "steps' --seed, of carving held-out rows from a dataset without an eval split.")
    p.add_argument("--num_samples", type=int, default=12, help="Prompts shown in samples.md.")
    p.add_argument("--output_dir", default="output/eval", help="Where the report and samples go.")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Allow model/tokenizer code from the model folders or hub to run.")
    args = p.parse_args(argv)
    if min(args.eval_prompts, args.samples_per_prompt, args.max_prompt_seq_len, args.max_answer_seq_len,
           args.batch_size) < 1:
        raise UserError("--eval_prompts, --samples_per_prompt, --max_prompt_seq_len, --max_answer_seq_len and "
                        "--batch_size must be >= 1")
    if args.greedy:
        args.samples_per_prompt = 1  # greedy answers to one prompt are all the same
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.num_samples < 0:
        raise UserError("--temperature must be > 0, --top_p in (0, 1], --top_k >= 0 and --num_samples >= 0")
    return args


def named_models(specs: list[str]) -> dict[str, str]:
    """{name: path} from NAME=PATH (or PATH, named after its folder) words; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if not name or not path:
            raise UserError(f"--models {spec!r}: write NAME=PATH or PATH")
        if name in out:
            raise UserError(f"--models: the name {name!r} is given twice; name the models NAME=PATH")
        out[name] = path
    return out


def held_out_prompts(data_path: list[str], tokenizer, width: int, limit: int, seed: int
                     ) -> tuple[list[str], list[torch.Tensor]]:
    """The first `limit` distinct eval prompts of the datasets that fit `width` tokens: (texts, token ids)."""
    texts, ids = [], []
    for spec in data_path or [BUNDLED]:
        _, rows = load_source(spec, tokenizer, seed)
        for prompt in dict.fromkeys(r.prompt for r in rows):
            tokens = tokenizer(prompt)["input_ids"]
            if len(tokens) <= width:
                texts.append(prompt)
                ids.append(torch.tensor(tokens))
    if not texts:
        raise UserError(f"no held-out prompt fits --max_prompt_seq_len {width}; raise it")
    return texts[:limit], ids[:limit]


def checked_tokenizer(args: argparse.Namespace, paths: dict[str, str]) -> Any:
    """The first model's tokenizer, once every model path the run reads is checked (`check_model_path`) and
    shares its vocabulary; errors name the model (its --models name, reference or reward)."""
    given = [(path, name, "models") for name, path in paths.items()]
    given += [(path, role, flag) for path, role, flag in ((args.reference, "reference", "reference"),
                                                           (args.reward_model, "reward", "reward_model")) if path]
    for path, role, flag in given:
        check_model_path(path, role, flag)
    model_args = ModelArgs(trust_remote_code=args.trust_remote_code)
    first, first_role = given[0][:2]
    tokenizer = load_tokenizer(first, model_args, padding_side="left", role=first_role)
    seen = {first}
    for path, role, _ in given:
        if path in seen:
            continue
        seen.add(path)
        if load_tokenizer(path, model_args, padding_side="left", role=role).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{path} (the {role} model) has another tokenizer than {first}; the models compared, the "
                            "reference and the reward model must share one vocabulary")
    return tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    out = check_output_dir(args.output_dir)
    paths = named_models(args.models)
    device = torch.device("cuda" if gpu_wanted() else "cpu")
    first = next(iter(paths.values()))

    # Inputs first: every folder exists and shares one vocabulary, and the reward model is one, before
    # any answer is generated. Then one compared model at a time is in memory (with reference and RM).
    tokenizer = checked_tokenizer(args, paths)
    reward = (RewardModel(load_reward_for_inference(args.reward_model, args.trust_remote_code,
                                                    flag="reward_model")[0]).to(device).eval()
              if args.reward_model else None)
    ref_path = args.reference or first
    reference = load_for_inference(ref_path, args.trust_remote_code, role="reference" if args.reference else
                                   next(iter(paths)), flag="reference" if args.reference else "models")[0].to(device)
    texts, prompt_ids = held_out_prompts(args.data_path, tokenizer, args.max_prompt_seq_len, args.eval_prompts,
                                         args.seed)

    gen_kwargs = {"max_new_tokens": args.max_answer_seq_len, "do_sample": not args.greedy,
                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if not args.greedy:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    k = args.samples_per_prompt
    texts_k, ids_k = [t for t in texts for _ in range(k)], [x for x in prompt_ids for _ in range(k)]
    results = {}
    for name, path in paths.items():
        logger.info("answering %d held-out prompts %d times with %s (%s)", len(texts), k, name, path)
        model = (reference if path == ref_path else
                 load_for_inference(path, args.trust_remote_code, role=name, flag="models")[0].to(device))
        results[name] = run_model(model, reference, reward, tokenizer, texts_k, ids_k, args.max_prompt_seq_len,
                                  gen_kwargs, args.batch_size, args.seed, device)
        del model
    summary = summarize(results)

    report = {"models": {name: {"path": paths[name], **row} for name, row in summary.items()},
              "baseline": next(iter(paths)), "reference": ref_path, "reward_model": args.reward_model,
              "prompts": len(texts), "samples_per_prompt": k, "seed": args.seed,
              "decoding": {key: v for key, v in gen_kwargs.items() if not key.endswith("_id")}}
    table = markdown_table(summary)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "eval_report.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "eval_report.md", f"Held-out prompts: {len(texts)} x {k} answers; decoding: "
                          f"{'greedy' if args.greedy else 'sampled, seed ' + str(args.seed)}; KL reference: "
                          f"{ref_path}; reward model: {args.reward_model or 'none'}\n\n{table}")
    write_atomically(out / "samples.md", markdown_samples(texts_k, results, args.num_samples, stride=k))
    print(table, flush=True)
    logger.info("wrote eval_report.json, eval_report.md and samples.md to %s", out)


if __name__ == "__main__":
    run_main(main)
