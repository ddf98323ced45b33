"""Compare a base model's and a fine-tuned model's answers to the same prompts.

    python step1_sft/prompt_eval.py --model_name_or_path_baseline BASE --model_name_or_path_finetune output/step1
    python step1_sft/prompt_eval.py ... --prompts " Human: sort 3 1 2 Assistant:" --num_beams 4

Without --prompts it uses held-out prompts of the bundled sorting task and also reports how many
answers are correct by the task's rule.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from engine.data.sort_task import generate as synthetic_rows
from engine.data.sort_task import is_correct, parse_prompt
from engine.errors import UserError
from engine.models.inference import check_model_path, generate, load_for_inference
from engine.runtime.entry import run_main

logger = logging.getLogger("engine")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path_baseline", required=True, help="The model before fine-tuning.")
    p.add_argument("--model_name_or_path_finetune", required=True, help="The fine-tuned model.")
    p.add_argument("--prompts", nargs="*", default=None, help="Prompts (default: 8 held-out sorting prompts).")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--num_beams", type=int, default=1, help="1 with no --top_k: greedy.")
    p.add_argument("--num_beam_groups", type=int, default=1)
    p.add_argument("--top_k", type=int, default=0, help="> 0: sample from the top k tokens.")
    p.add_argument("--penalty_alpha", type=float, default=None, help="Contrastive search strength.")
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise UserError("--max_new_tokens and --num_beams must be >= 1")
    prompts = args.prompts or [r.prompt for r in synthetic_rows(8, seed=99991)]
    sampling = {"num_beams": args.num_beams, "num_beam_groups": args.num_beam_groups,
                "num_return_sequences": args.num_return_sequences, "do_sample": args.top_k > 0}
    if args.top_k > 0:
        sampling["top_k"] = args.top_k
    if args.penalty_alpha is not None:
        sampling["penalty_alpha"] = args.penalty_alpha
    models = {name: getattr(args, f"model_name_or_path_{name}") for name in ("baseline", "finetune")}
    for name, path in models.items():  # both paths before either model is loaded
        check_model_path(path, name, f"model_name_or_path_{name}")
    answers = {}
    for name, path in models.items():
        model, tok = load_for_inference(path, args.trust_remote_code, role=name, flag=f"model_name_or_path_{name}")
        answers[name] = generate(model, tok, prompts, args.max_new_tokens, **sampling)
    per_prompt = args.num_return_sequences
    for i, prompt in enumerate(prompts):
        logger.info("==========prompt========== %r", prompt)
        for name in answers:
            for answer in answers[name][i * per_prompt:(i + 1) * per_prompt]:
                logger.info("  %-8s %r", name, answer)
    if all(parse_prompt(p) is not None for p in prompts):
        for name, outs in answers.items():
            correct = sum(is_correct(prompts[i // per_prompt], a) for i, a in enumerate(outs))
            logger.info("%s: %d/%d answers correct by the sorting rule", name, correct, len(outs))


if __name__ == "__main__":
    run_main(main)
