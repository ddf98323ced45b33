"""Rewards computed by code: user functions named on the command line (`--reward_funcs`), weighted and
checked, plus the built-in ones in `engine.rewards.builtin`.

- `functions.py`: resolving `path/to/file.py:function` / `package.module:function` references and
  `RewardFunctions`, which calls them with TRL's signature and returns the weighted reward per row.
- `builtin.py`: the bundled sorting task's rule (`sort_rule`) and GSM8K's final-answer match
  (`gsm8k_answer`).
"""
from engine.rewards.functions import RewardFunctions, function_stats, resolve_reference

__all__ = ["RewardFunctions", "function_stats", "resolve_reference"]
