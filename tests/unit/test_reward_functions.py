"""Reward functions: references resolved, TRL's call signature, weights, None as "no score", the errors
that name the function and the row, and the built-ins on hand-written cases."""
from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from engine.errors import UserError
from engine.rewards import RewardFunctions, function_stats, resolve_reference
from engine.rewards.builtin import final_number, gsm8k_answer, sort_rule, truth_number
from engine.rewards.functions import unique_names

FUNCS = textwrap.dedent('''
    import helper_beside_it  # a module next to the file: importable while the file loads

    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    def has_answer(prompts, completions, answer=None, **kw):
        # None for rows without an answer column value: no score
        return [None if a is None else float(a in c) for c, a in zip(completions, answer)]

    def never(prompts, completions, **kw):
        return [None] * len(completions)

    def raises_on_b(prompts, completions, **kw):
        return [1.0 / (c != "b") for c in completions]

    def too_short(prompts, completions, **kw):
        return [1.0]

    def text(prompts, completions, **kw):
        return [1.0, "high"][:len(completions)]

    def not_finite(prompts, completions, **kw):
        return [0.0, float("nan")][:len(completions)]

    def boolean(prompts, completions, **kw):
        return [c == "a" for c in completions]

    def seen(prompts, completions, **kw):
        return [float(len(kw)), float(len(prompts))][:len(completions)]

    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    NOT_A_FUNCTION = 3
''')


@pytest.fixture(scope="module")
def funcs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "helper_beside_it.py").write_text("")
    path = folder / "my_rewards.py"
    path.write_text(FUNCS)
    return str(path)


PROMPTS, COMPLETIONS = ["p0", "p1"], ["a", "b"]


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def test_a_file_reference_loads_without_leaving_its_folder_on_sys_path(funcs):
    before = list(sys.path)
    fn = resolve_reference(f"{funcs}:length")
    assert fn(prompts=["x"], completions=["abc"]) == [3.0]
    assert sys.path == before


def test_a_module_reference():
    assert resolve_reference("engine.rewards.builtin:sort_rule") is sort_rule


@pytest.mark.parametrize("ref, message", [
    ("engine.rewards.builtin", "no ':function' part; give path/to/file.py:function"),
    ("missing/file.py:f", "no file missing/file.py"),
    ("engine.no_such_module:f", "no module 'engine.no_such_module'"),
    ("engine.rewards.builtin:sort_rules", "has no 'sort_rules'; it defines .*sort_rule"),
    ("engine.rewards.builtin:NUMBER", "is a Pattern, not a function"),
])
def test_bad_references_name_the_reference_and_the_fix(ref, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_reference(ref)
    assert ref in str(err.value)


def test_a_file_that_fails_to_import_is_reported(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UserError, match=r"importing .*broken.py failed \(ModuleNotFoundError.*fix the file"):
        resolve_reference(f"{path}:f")


def test_repeated_names_are_numbered():
    assert unique_names(["acc", "acc", "fmt", "acc"]) == ["acc", "acc_2", "fmt", "acc_3"]


# ----------------------------------------------------------------------------------------------
# Calling and combining
# ----------------------------------------------------------------------------------------------
def test_weighted_sum_leaves_none_out_and_is_nan_when_nothing_scored(funcs):
    fns = RewardFunctions([f"{funcs}:length", f"{funcs}:has_answer", f"{funcs}:never"], weights=[0.5, 2.0, 7.0])
    rewards, values, stats = fns(["p0", "p1", "p2"], ["ab", "xyz", "q"], {"answer": ["b", None, "z"]})
    # length: 2, 3, 1; has_answer: 1 ("b" in "ab"), None, 0; never: None everywhere
    # row 0: 0.5*2 + 2*1 = 3; row 1: 0.5*3 (has_answer left out, not 0) = 1.5; row 2: 0.5*1 + 2*0 = 0.5
    assert rewards.tolist() == [3.0, 1.5, 0.5]
    assert values[:, 0].tolist() == [2.0, 3.0, 1.0] and values[1, 1].isnan() and values[:, 2].isnan().all()
    # has_answer over the rows it scored: mean of (1, 0) = 0.5, population std 0.5; never: not logged
    assert stats["reward/has_answer_mean"] == 0.5 and stats["reward/has_answer_std"] == 0.5
    assert stats["reward/length_mean"] == 2.0
    assert not any(k.startswith("reward/never") for k in stats)

    only_none = RewardFunctions([f"{funcs}:never"])
    assert only_none(PROMPTS, COMPLETIONS)[0].isnan().all()


def test_columns_arrive_as_keyword_arguments(funcs):
    # `seen` returns [how many columns it got, how many prompts]
    rewards, _, _ = RewardFunctions([f"{funcs}:seen"])(PROMPTS, COMPLETIONS, {"answer": [1, 2], "level": ["a", "b"]})
    assert rewards.tolist() == [2.0, 2.0]


def test_weights_default_to_one_and_booleans_count_as_numbers(funcs):
    fns = RewardFunctions([f"{funcs}:boolean", f"{funcs}:boolean"])
    assert fns.names == ["boolean", "boolean_2"] and fns.weights == [1.0, 1.0]
    assert RewardFunctions([f"{funcs}:boolean"], weights=[]).weights == [1.0]  # the flag's empty default
    assert fns(PROMPTS, COMPLETIONS)[0].tolist() == [2.0, 0.0]


def test_a_weight_count_mismatch_names_both_flags(funcs):
    with pytest.raises(UserError, match="--reward_weights has 1 values but --reward_funcs names 2 functions"):
        RewardFunctions([f"{funcs}:length", f"{funcs}:never"], weights=[1.0])
    with pytest.raises(UserError, match="finite"):
        RewardFunctions([f"{funcs}:length"], weights=[math.inf])


@pytest.mark.parametrize("name, message", [
    ("raises_on_b", r"'raises_on_b' raised ZeroDivisionError: .* on row 1 \(prompt 'p1'\)"),
    ("too_short", "'too_short' returned 1 values for a batch of 2 rows"),
    ("text", r"'text' returned str 'high' for row 1 \(prompt 'p1'\); return a float, or None"),
    ("not_finite", r"'not_finite' returned nan for row 1 \(prompt 'p1'\); return a finite float"),
])
def test_a_bad_function_stops_with_its_name_and_row(funcs, name, message):
    fns = RewardFunctions([f"{funcs}:length", f"{funcs}:{name}"])
    with pytest.raises(UserError, match=message):
        fns(PROMPTS, COMPLETIONS)


def test_a_function_without_kwargs_is_told_to_take_them(funcs):
    with pytest.raises(UserError, match="'no_kwargs' raised TypeError: .*'answer' on row 0 .*; give it a \\*\\*kwargs"):
        RewardFunctions([f"{funcs}:no_kwargs"])(PROMPTS, COMPLETIONS, {"answer": ["1", "2"]})


def test_stats_of_a_values_matrix():
    values = torch.tensor([[1.0, math.nan], [3.0, math.nan]])
    assert function_stats(values, ["a", "b"]) == {"reward/a_mean": 2.0, "reward/a_std": 1.0}


# ----------------------------------------------------------------------------------------------
# Built-ins
# ----------------------------------------------------------------------------------------------
def test_sort_rule():
    prompts = [" Human: sort 3 1 2 Assistant:", " Human: sort 3 1 2 Assistant:", " Human: what is 2+2? Assistant:"]
    assert sort_rule(prompts, [" 1 2 3<|endoftext|>", " 1 3 2", " 4"]) == [1.0, 0.0, None]


def test_gsm8k_numbers():
    assert truth_number("She has 3 + 4 = 7 apples.\n#### 1,007") == truth_number("1007.0") == truth_number(1007)
    assert final_number("so 5 apples.\n#### 12") == 12  # after ####, not the last number of the text
    assert final_number("3 + 4 = 7, so the answer is -1,250.") == -1250  # else the last number; comma, period
    assert final_number("no number here") is None
    with pytest.raises(ValueError, match="no '#### <number>'"):
        truth_number("seven")


def test_gsm8k_answer_scores_and_columns():
    truths = ["... #### 72", "#### 10", "#### 5", None]
    completions = ["48 + 24 = 72", "The answer is #### 10.00", "I think 6", "anything"]
    assert gsm8k_answer(["q"] * 4, completions, answer=truths) == [1.0, 1.0, 0.0, None]
    assert gsm8k_answer(["q"], ["it is 3"], ground_truth=["3"]) == [1.0]
    with pytest.raises(ValueError, match="needs an 'answer' or 'ground_truth' column"):
        gsm8k_answer(["q"], ["3"])


def test_gsm8k_without_a_ground_truth_column_names_the_function():
    fns = RewardFunctions(["engine.rewards.builtin:gsm8k_answer"])
    with pytest.raises(UserError, match="'gsm8k_answer' raised ValueError: .*--prompt_column_map"):
        fns(["q"], ["3"], {"question": ["q"]})
