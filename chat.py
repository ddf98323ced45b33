"""Talk to a trained actor (any saved Hugging Face causal-LM folder, e.g. a step-3 `actor/`).

    python chat.py --path output/step3_rlhf/actor                      # interactive, with history
    python chat.py --path output/step3_rlhf/actor --prompt "sort 3 1 2" # one answer, then exit

In the interactive mode each turn sees the conversation so far; type `clear` to forget it and `quit`
(or Ctrl-D) to leave. Turns are rendered with the tokenizer's chat template when it has one, else in
DeepSpeed-Chat's format (" Human: ... Assistant: ..."), which is what the steps train on.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from engine.errors import UserError
from engine.helptext import HelpFormatter
from engine.models.inference import generate, load_for_inference
from engine.runtime.entry import run_main

HUMAN, ASSISTANT = " Human: ", " Assistant:"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--path", required=True, help="The model folder (or hub name) to talk to.")
    p.add_argument("--prompt", default=None, help="Answer this one message and exit. Default: talk until quit.")
    p.add_argument("--max_new_tokens", type=int, default=128, help="Most tokens per answer.")
    p.add_argument("--do_sample", action="store_true", help="Sample. Default: greedy decoding.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (with --do_sample).")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="Nucleus sampling: keep the smallest token set with this probability mass (with --do_sample).")
    p.add_argument("--top_k", type=int, default=0,
                   help="Sample among the k most likely tokens (0: all; with --do_sample).")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Allow model/tokenizer code from the model folder or hub to run.")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--max_new_tokens must be >= 1, --temperature > 0, --top_p in (0, 1] and --top_k >= 0")
    return args


def render(history: list[tuple[str, str]], message: str, tokenizer: Any) -> str:
    """The prompt for `message` after the (user, assistant) turns of `history`."""
    if getattr(tokenizer, "chat_template", None):
        turns = [m for user, answer in history for m in ({"role": "user", "content": user},
                                                           {"role": "assistant", "content": answer})]
        return tokenizer.apply_chat_template(turns + [{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    past = "".join(f"{HUMAN}{user}{ASSISTANT} {answer}" for user, answer in history)
    return f"{past}{HUMAN}{message}{ASSISTANT}"


def clean(answer: str) -> str:
    """The answer up to where the model starts writing the next human turn itself."""
    return answer.split(HUMAN.strip())[0].strip()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    model, tok = load_for_inference(args.path, args.trust_remote_code)
    sampling = {"do_sample": args.do_sample}
    if args.do_sample:
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

    def reply(history: list[tuple[str, str]], message: str) -> str:
        return clean(generate(model, tok, [render(history, message, tok)], args.max_new_tokens, **sampling)[0])

    if args.prompt is not None:
        print(reply([], args.prompt))
        return
    history: list[tuple[str, str]] = []
    print(f"chatting with {args.path}; 'clear' forgets the conversation, 'quit' or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            message = input("Human: ").strip()
        except EOFError:
            break
        if message in ("quit", "exit"):
            break
        if message == "clear":
            history = []
            continue
        if message:
            answer = reply(history, message)
            print(f"Assistant: {answer}", flush=True)
            history.append((message, answer))


if __name__ == "__main__":
    run_main(main)
