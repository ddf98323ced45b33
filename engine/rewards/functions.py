"""Reward functions named by reference, called with TRL's signature, weighted and checked.

A reference is `path/to/file.py:function` (a file, loaded by path) or `package.module:function` (an
importable module). Each function is called once per batch as

    fn(prompts=[...], completions=[...], **columns) -> list[float | None]

with keyword arguments only (TRL's convention, so functions written for TRL's `GRPOTrainer` work): the
columns are the prompt dataset's other fields (e.g. `answer`, `ground_truth`), one list per field,
aligned with the batch. A function should take `**kwargs` so that columns it does not use are accepted.

What a function may return, per row: a real number (`bool` counts, as 1.0 / 0.0: `a == b` is a common
reward), or `None` for "no score" (this function has nothing to say about the row, e.g. a math checker
on a coding prompt). The list may also be a 1-D tensor or array. NaN and infinity are errors, not "no
score": they usually mean a bug, and one NaN would poison every advantage of its group.

Combining: a row's reward is the weighted sum over the functions that scored it (`None`s are left out,
not counted as 0); a row no function scored gets NaN, which the estimators must treat as "no reward"
(e.g. leave it out of its group's baseline).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError

RewardFn = Callable[..., Any]
FIX = "give path/to/file.py:function or package.module:function"


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def resolve_reference(ref: str) -> RewardFn:
    """The callable named by `ref` (`path/to/file.py:function` or `package.module:function`)."""
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise UserError(f"--reward_funcs {ref!r}: no ':function' part; {FIX}")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _load_file(ref, Path(where).expanduser()) if is_file else _import_module(ref, where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserError(f"--reward_funcs {ref!r}: {where} has no {attr!r}; it defines "
                            f"{', '.join(defined) or 'no public function'}; fix the name after the ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--reward_funcs {ref!r}: {attr!r} is a {type(obj).__name__}, not a function; name a "
                        "function fn(prompts, completions, **columns)")
    return obj


def _load_file(ref: str, path: Path) -> Any:
    """The module of a .py file, loaded by path under a name of its own (so two files with the same name do
    not clash). Its folder is on sys.path only while the file runs, so it can import modules beside it
    at the top, without shadowing other modules for the rest of the run."""
    if not path.is_file():
        raise UserError(f"--reward_funcs {ref!r}: no file {path}; {FIX}, with a path that exists")
    path = path.resolve()
    name = f"_reward_file_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:  # the same file named twice (e.g. two of its functions): load it once
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"--reward_funcs {ref!r}: {path} cannot be loaded as Python; {FIX}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # while it runs too: dataclasses and pickling look the module up here
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - whatever the user's file raises is reported, not a traceback
        del sys.modules[name]
        raise UserError(f"--reward_funcs {ref!r}: importing {path} failed ({type(err).__name__}: {err}); "
                        "fix the file") from err
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(ref: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise UserError(f"--reward_funcs {ref!r}: no module {err.name!r} ({err}); install it, fix the module "
                        "name, or give the file's path (path/to/file.py:function)") from err
    except Exception as err:  # noqa: BLE001 - the module's own import errors are the user's to fix
        raise UserError(f"--reward_funcs {ref!r}: importing {name} failed ({type(err).__name__}: {err}); "
                        "fix the module") from err


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with repeats numbered by order: ['acc', 'acc', 'fmt'] -> ['acc', 'acc_2', 'fmt']."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return out


# ----------------------------------------------------------------------------------------------
# Calling and combining
# ----------------------------------------------------------------------------------------------
class RewardFunctions:
    """The functions of `--reward_funcs` with their `--reward_weights`, called together on a batch.

    `references`: reference strings (resolved here) or callables. `weights`: one per function, or None /
    empty (the flag's default) for all 1.0. `names`: the log names (default: the function's name in its
    reference, repeats numbered `_2`, `_3`, ...), used in `reward/<name>_mean` and in error messages.
    """

    def __init__(self, references: Sequence[str | RewardFn], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None):
        if not references:
            raise UserError("--reward_funcs is empty; name at least one function (path/to/file.py:function)")
        if weights and len(weights) != len(references):
            raise UserError(f"--reward_weights has {len(weights)} values but --reward_funcs names {len(references)} "
                            "functions; give one weight per function, or none for all 1.0")
        weights = [float(w) for w in weights] if weights else [1.0] * len(references)
        if not all(math.isfinite(w) for w in weights):
            raise UserError(f"--reward_weights {weights}: every weight must be a finite number")
        self.functions = [resolve_reference(r) if isinstance(r, str) else r for r in references]
        self.weights = weights
        default_names = [r.rpartition(":")[2].rpartition(".")[2] if isinstance(r, str)
                         else getattr(r, "__name__", type(r).__name__) for r in references]
        self.names = unique_names(names if names is not None else default_names)

    def __len__(self) -> int:
        return len(self.functions)

    def __call__(self, prompts: list[str], completions: list[str], columns: Mapping[str, list] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(rewards, values, stats) of a batch of B rows.

        rewards: (B,) float32, the weighted sum over the functions that scored each row, NaN where none did.
        values:  (B, F) float32, function f's score of row i, NaN where it returned None.
        stats:   `reward/<name>_mean` and `_std` per function over the rows it scored (none: not logged).
        Every function is called and checked before anything is returned, so a bad function raises a
        UserError before the caller changes any state.
        """
        columns = dict(columns or {})
        _check_columns(prompts, completions, columns)
        values = torch.stack([self._scores(i, prompts, completions, columns) for i in range(len(self))], dim=1)
        weights = torch.tensor(self.weights, dtype=values.dtype)
        scored = ~values.isnan()
        rewards = torch.where(scored, values, 0.0).mul(weights).sum(dim=1)
        rewards = torch.where(scored.any(dim=1), rewards, torch.nan)
        return rewards, values, function_stats(values, self.names)

    def _scores(self, index: int, prompts: list[str], completions: list[str], columns: dict[str, list]
                ) -> torch.Tensor:
        """(B,) float32 scores of function `index`, NaN for None; a UserError for anything else bad."""
        fn, name = self.functions[index], self.names[index]
        try:
            out = fn(prompts=prompts, completions=completions, **columns)
        except Exception as err:  # noqa: BLE001 - a user function's failure is reported with its row
            row = _first_failing_row(fn, prompts, completions, columns)
            at = f"on row {row} (prompt {_excerpt(prompts[row])})" if row is not None else "on this batch"
            fix = ("give it a **kwargs parameter (it gets every column of the prompt dataset)"
                   if isinstance(err, TypeError) and "keyword argument" in str(err)
                   else "fix the function (return None for rows it cannot score)")
            raise UserError(f"reward function {name!r} raised {type(err).__name__}: {err} {at}; {fix}") from err
        out = out.tolist() if hasattr(out, "tolist") else out
        if not isinstance(out, (list, tuple)) or len(out) != len(prompts):
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
            raise UserError(f"reward function {name!r} returned {got} for a batch of {len(prompts)} rows; return "
                            "a list with one float (or None) per completion")
        return torch.tensor([_score(name, i, v, prompts) for i, v in enumerate(out)], dtype=torch.float32)


def _score(name: str, row: int, value: Any, prompts: list[str]) -> float:
    if value is None:
        return math.nan
    if not isinstance(value, numbers.Real):
        raise UserError(f"reward function {name!r} returned {type(value).__name__} {value!r:.60} for row {row} "
                        f"(prompt {_excerpt(prompts[row])}); return a float, or None for no score")
    if not math.isfinite(value):
        raise UserError(f"reward function {name!r} returned {value} for row {row} (prompt "
                        f"{_excerpt(prompts[row])}); return a finite float, or None for no score")
    return float(value)


def _check_columns(prompts: list[str], completions: list[str], columns: dict[str, list]) -> None:
    """Misaligned inputs are the caller's bug, not the user's: a ValueError."""
    if len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    for key, col in columns.items():
        if key in ("prompts", "completions"):
            raise ValueError(f"a column may not be named {key!r}: it would replace the argument of that name")
        if len(col) != len(prompts):
            raise ValueError(f"column {key!r} has {len(col)} values for {len(prompts)} rows")


def _first_failing_row(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
                       ) -> int | None:
    """The first row that raises when `fn` is called on it alone (to name it in the error), or None."""
    for i in range(len(prompts)):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001 - only which row raises matters here
            return i
    return None


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def function_stats(values: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """`reward/<name>_mean` and `reward/<name>_std` (population std) of each column of `values` (B, F) over
    its non-NaN rows; a function that scored no row has no entry (a mean of nothing is not a number)."""
    stats: dict[str, float] = {}
    for f, name in enumerate(names):
        scored = values[:, f][~values[:, f].isnan()]
        if scored.numel():
            stats[f"reward/{name}_mean"] = scored.mean().item()
            stats[f"reward/{name}_std"] = scored.std(unbiased=False).item()
    return stats
