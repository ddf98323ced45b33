"""`--data_split`: each step gets its own disjoint, seeded, deterministic slice of every dataset."""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from engine.config import DataArgs, Step1DataArgs, parse_data_split
from engine.data.rows import Row
from engine.data.sources import data_sources, load_source
from engine.errors import UserError


def phase_slice(n: int, weights: Sequence[float], phase: int, seed: int) -> list[int]:
    """Indices of rows 0..n-1 that step `phase` (1, 2 or 3) uses.

    One seeded permutation per dataset; contiguous ranges of it by the cumulative weights, so the
    three steps' slices are disjoint and together cover every row.
    """
    if phase not in (1, 2, 3):
        raise ValueError(f"phase must be 1, 2 or 3, not {phase}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    cuts = [round(n * b) for b in bounds]
    cuts[-1] = n
    return sorted(order[cuts[phase - 1]:cuts[phase]])


def dschat_phase_slice(n: int, weights: Sequence[float], phase: int, seed: int) -> list[int]:
    """`phase_slice` by DeepSpeed-Chat's rule (its data_utils `get_raw_dataset_split_index`), in its order: a
    numpy RandomState(seed) shuffle of 0..n-1, cut at cumulative rounded shares, every cut shifted so the last
    is n."""
    import numpy as np

    if phase not in (1, 2, 3):
        raise ValueError(f"phase must be 1, 2 or 3, not {phase}")
    cuts = [0]
    for w in weights:
        cuts.append(cuts[-1] + int(round(w * float(n))))
    excess = cuts[-1] - n
    cuts = [cuts[0]] + [c - excess for c in cuts[1:]]  # DeepSpeed-Chat moves every cut but the first
    order = np.arange(n, dtype=np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64)
    np.random.RandomState(seed=seed).shuffle(order)
    # Sliced as DeepSpeed-Chat slices, a negative cut included (possible only for a near-zero share of a few rows).
    return order[cuts[phase - 1]:cuts[phase]].tolist()


SPLIT_RULES = {"none": phase_slice, "dschat": dschat_phase_slice}


def phase_rows(data: DataArgs, tokenizer: Any, phase: int, seed: int,
               prompt_columns: Mapping[str, str] | None = None) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows of one step over all --data_path sources (+ --sft_only_data_path for step 1);
    `prompt_columns` as in `engine.data.sources.read_rows` (step 3's prompt rows with their columns)."""
    weights = parse_data_split(data.data_split)
    pick = SPLIT_RULES[data.data_split_compat]
    train: list[Row] = []
    evals: list[Row] = []
    available = 0
    for spec in data_sources(data.data_path):
        tr, ev = load_source(spec, tokenizer, seed, prompt_columns)
        available += len(tr)
        train += [tr[i] for i in pick(len(tr), weights, phase, seed)]
        evals += [ev[i] for i in pick(len(ev), weights, phase, seed)]
    if phase == 1 and isinstance(data, Step1DataArgs):
        for spec in data.sft_only_data_path:
            tr, ev = load_source(spec, tokenizer, seed)
            train += tr
            evals += ev
    if not train:
        raise UserError(f"--data_split {data.data_split} gives step {phase} none of the {available} training rows of "
                        f"--data_path; give step {phase} a larger share (e.g. --data_split 2,4,4) or more rows")
    return train, evals
