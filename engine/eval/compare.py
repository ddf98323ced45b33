"""Comparing actors (SFT vs RLHF vs EMA, ...) on held-out prompts: what `step3_rlhf/evaluate.py` reports.

Per model: the reward model's mean score and the win rate against the first model by that score (when a
reward model is given), the KL
to a reference per answer, answer lengths and, where the prompts are the bundled task's, the success
rate by its rule (`engine.data.sort_task.is_correct`). The summaries (`win_rates`, `summarize`) are pure
functions, tested on hand-made numbers; `run_model` does the generation and scoring.

Conventions are step 3's: prompts left-padded to the prompt width, answers up to and including their
first eos (`engine.ppo.experience.sequence_masks`), score at the last real token, KL per answer the k1
estimate summed over its actions (`rollout/kl` in step 3), so the numbers compare with step 3's logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.data import sort_task
from engine.data.prompts import collate_left_padded
from engine.ppo.experience import reward_scores, sequence_logprobs, sequence_masks
from engine.rl.ppo import kl_penalty


@dataclass
class Answers:
    """One model's answers to N prompts, and what they are measured by."""

    answers: list[str]            # N decoded answers (special tokens dropped)
    scores: torch.Tensor | None   # (N,) reward-model score; None when no reward model scores
    kl: torch.Tensor              # (N,) sum over the answer's actions of log pi - log pi_ref
    lengths: torch.Tensor         # (N,) answer tokens, eos included
    correct: torch.Tensor | None  # (N,) bool by the task's rule; None when the prompts have none


def win_rates(scores: torch.Tensor) -> torch.Tensor:
    """(M,) for scores (M, N) of M models on the same N prompts: the share of prompts where model m's
    answer scores above the first model's, a tie counting half (so the first model's own is 0.5)."""
    first = scores[:1]
    return ((scores > first).double() + 0.5 * (scores == first).double()).mean(dim=1)


def rule_checks(prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) bool: the prompt is the bundled task's, (N,) bool: its answer is right by the task's rule,
    `engine.data.sort_task.is_correct`; False where the prompt is not the task's)."""
    checked = torch.tensor([sort_task.parse_prompt(p) is not None for p in prompts], dtype=torch.bool)
    correct = torch.tensor([bool(c) and sort_task.is_correct(p, a) for p, a, c in zip(prompts, answers, checked)],
                           dtype=torch.bool)
    return checked, correct


def rule_truth(prompts: list[str], answers: list[str]) -> torch.Tensor | None:
    """(N,) bool: each answer right by the bundled task's rule; None unless every prompt is the task's."""
    checked, correct = rule_checks(prompts, answers)
    return correct if prompts and bool(checked.all()) else None


def summarize(results: dict[str, Answers]) -> dict[str, dict[str, float]]:
    """Per model (in the order given, the first is the baseline of the win rate): kl_to_ref,
    response_len_mean/std/max, empty_answers; score_mean, score_std and win_rate_vs_first when a reward model
    scored; rule_success_rate where the prompts have a rule."""
    names = list(results)
    scored = all(results[n].scores is not None for n in names)
    wins = win_rates(torch.stack([results[n].scores.double() for n in names])).tolist() if scored else None
    out = {}
    for i, name in enumerate(names):
        r = results[name]
        lengths = r.lengths.double()
        row = {"kl_to_ref": float(r.kl.double().mean()), "response_len_mean": float(lengths.mean()),
               "response_len_std": _std(lengths), "response_len_max": float(lengths.max()),
               "empty_answers": int((lengths == 0).sum())}
        if wins is not None:
            scores = r.scores.double()
            row |= {"score_mean": float(scores.mean()), "score_std": _std(scores), "win_rate_vs_first": wins[i]}
        if r.correct is not None:
            row["rule_success_rate"] = float(r.correct.double().mean())
        out[name] = row
    return out


def _std(x: torch.Tensor) -> float:
    """Population standard deviation (0 for a single value)."""
    return float(x.std(unbiased=False)) if x.numel() > 1 else 0.0


@torch.no_grad()
def run_model(model: Any, reference: Any, reward: Any, tokenizer: Any, prompts: list[str],
              prompt_ids: list[torch.Tensor], width: int, gen_kwargs: dict[str, Any], batch_size: int, seed: int,
              device: torch.device) -> Answers:
    """Generate `model`'s answers to the prompts (token ids `prompt_ids`, left-padded to `width`) in
    batches of `batch_size` and measure them with `reference` (a causal LM) and `reward` (a
    `RewardModel`, or None: no scores). Sampling starts from `seed`, so two identical models give identical
    answers."""
    torch.manual_seed(seed)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    answers, scores, kls, lengths = [], [], [], []
    for start in range(0, len(prompt_ids), batch_size):
        batch = collate_left_padded(prompt_ids[start:start + batch_size], pad, width)
        batch = {k: v.to(device) for k, v in batch.items()}
        sequences = model.generate(**batch, **gen_kwargs)
        mask, action_mask = sequence_masks(sequences, width, pad, eos, batch["attention_mask"])
        logprobs, _ = sequence_logprobs(model, sequences, mask)
        ref_logprobs, _ = sequence_logprobs(reference, sequences, mask)
        kls.append((kl_penalty(logprobs, ref_logprobs, "k1") * action_mask).sum(dim=1).cpu())
        if reward is not None:
            scores.append(reward_scores(reward, sequences, mask).float().cpu())
        lengths.append(action_mask.sum(dim=1).cpu())
        for row, row_mask in zip(sequences[:, width:], mask[:, width:].bool()):
            answers.append(tokenizer.decode(row[row_mask], skip_special_tokens=True))
    return Answers(answers, torch.cat(scores) if scores else None, torch.cat(kls), torch.cat(lengths),
                   rule_truth(prompts, answers))


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """The per-model summary as a Markdown table (the reward model's columns and rule success only when
    defined)."""
    names = list(summary)
    has_rule = all("rule_success_rate" in row for row in summary.values())
    scored = all("score_mean" in row for row in summary.values())
    head = ["model", *(["RM score (mean ± std)", f"win rate vs {names[0]}"] if scored else []), "KL to ref",
            "answer tokens (mean ± std)"]
    lines = ["| " + " | ".join(head + (["rule success"] if has_rule else [])) + " |",
             "|" + "---|" * (len(head) + has_rule)]
    for name, r in summary.items():
        cells = [name, *([f"{r['score_mean']:.3f} ± {r['score_std']:.3f}", f"{r['win_rate_vs_first']:.3f}"]
                         if scored else []),
                 f"{r['kl_to_ref']:.3f}", f"{r['response_len_mean']:.2f} ± {r['response_len_std']:.2f}"]
        if has_rule:
            cells.append(f"{r['rule_success_rate']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_samples(prompts: list[str], results: dict[str, Answers], count: int, stride: int = 1) -> str:
    """`count` prompts with every model's answer side by side (score when scored, and ✓/✗ by the rule): answers 0,
    stride, 2·stride, ... (with several answers per prompt, the first answer to each prompt)."""
    names = list(results)
    lines = ["| prompt | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i in range(0, min(count * stride, len(prompts)), stride):
        cells = [_cell(prompts[i])]
        for name in names:
            r = results[name]
            mark = "" if r.correct is None else ("✓" if bool(r.correct[i]) else "✗")
            score = "" if r.scores is None else f"{float(r.scores[i]):.2f}"
            note = " ".join(x for x in (score, mark) if x)
            cells.append(_cell(r.answers[i]) + (f" ({note})" if note else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, code-formatted."""
    text = " ".join(text.split()).replace("|", "\\|").replace("`", "'")
    return f"`{text}`" if text else "*(empty)*"

