"""Score answers with a trained reward model.

    python step2_reward/rw_eval.py --model_name_or_path output/step2 \
        --prompt " Human: sort 3 1 2 Assistant:" --response " 1 2 3" " 3 2 1"
    python step2_reward/rw_eval.py --model_name_or_path output/step2 --data_file pairs.jsonl

A --data_file holds rows of the training schemas (prompt + chosen + rejected, or prompt + response);
with pairs it also reports the pairwise accuracy. The model is loaded with plain
`AutoModelForSequenceClassification`, so this also checks the folder works outside this engine.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from engine.data.pairs import tokenize_scored
from engine.data.sft import right_pad
from engine.data.sources import read_rows
from engine.errors import UserError
from engine.models.inference import load_reward_for_inference
from engine.runtime.entry import run_main

logger = logging.getLogger("engine")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="A step-2 output folder.")
    p.add_argument("--prompt", default=None, help="One prompt, scored with each --response.")
    p.add_argument("--response", nargs="*", default=[], help="Answers to --prompt.")
    p.add_argument("--data_file", default=None, help="A .jsonl/.json/.parquet file of rows to score.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_padding_at_beginning", type=int, default=1,
                   help="Accepted for DeepSpeed-Chat's scripts; masks come from the tokenizer here.")
    p.add_argument("--add_eot_token", action="store_true",
                   help="End answers with <|endoftext|> (only for folders without the config.yaml step 2 writes).")
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args(argv)
    if (args.data_file is None) == (args.prompt is None) or (args.prompt is not None and not args.response):
        raise UserError("give either --prompt with one or more --response, or --data_file")
    return args


def end_token(path: str, tok, add_eot_token: bool) -> int:
    """The end token step 2 appended: from the folder's saved config when there is one, else the flags."""
    saved = Path(path).expanduser() / "config.yaml"
    data = yaml.safe_load(saved.read_text()).get("data", {}) if saved.is_file() else {}
    use_eot = data.get("add_eot_token", add_eot_token)
    return tok.convert_tokens_to_ids(data.get("eot_token", "<|endoftext|>")) if use_eot else tok.eos_token_id


@torch.no_grad()
def score(model, tok, prompts: list[str], answers: list[str], batch_size: int, end_id: int) -> list[float]:
    """The reward of each prompt + answer, tokenised as step 2 tokenises them."""
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        seqs = [torch.tensor(tokenize_scored(p, a, tok, end_id))
                for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
        input_ids, mask = right_pad(seqs, tok.pad_token_id)
        out += model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1).tolist()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, tok = load_reward_for_inference(args.model_name_or_path, args.trust_remote_code)
    end_id = end_token(args.model_name_or_path, tok, args.add_eot_token)
    if args.prompt is not None:
        answers = args.response
        scores = score(model, tok, [args.prompt] * len(answers), answers, args.batch_size, end_id)
        for answer, s in zip(answers, scores):
            logger.info("%8.4f  %r", s, answer)
        return
    rows = read_rows(Path(args.data_file), tok)
    chosen = score(model, tok, [r.prompt for r in rows], [r.chosen for r in rows], args.batch_size, end_id)
    pairs = [(r, c) for r, c in zip(rows, chosen) if r.rejected is not None]
    rejected = score(model, tok, [r.prompt for r, _ in pairs], [r.rejected for r, _ in pairs], args.batch_size,
                     end_id)
    for row, c in zip(rows, chosen):
        logger.info("%8.4f  %r", c, row.prompt + row.chosen)
    if pairs:
        wins = sum(c > r for (_, c), r in zip(pairs, rejected))
        logger.info("pairwise accuracy: %d/%d = %.3f (chosen scored above rejected)", wins, len(pairs),
                    wins / len(pairs))


if __name__ == "__main__":
    run_main(main)
