"""engine/runtime/faults.py: the entries, the rank and step ranges, and one parse per value of the variable."""
from __future__ import annotations

import pytest
import torch

from engine.runtime import faults


def test_parse_entries_ranges_and_ranks():
    assert faults.parse("kill:5:1, nan:3-4,nan:7-") == [faults.Fault("kill", 5, 5, 1), faults.Fault("nan", 3, 4, None),
                                                        faults.Fault("nan", 7, None, None)]
    with pytest.raises(ValueError, match="bad entry 'boom:1'"):
        faults.parse("boom:1")


def test_active_by_step_and_rank_parses_each_value_once(monkeypatch):
    calls = []
    real = faults.parse
    monkeypatch.setattr(faults, "parse", lambda text: calls.append(text) or real(text))
    faults._parsed.cache_clear()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(faults.ENV, "nan:3-4,raise:2:0")
    assert [faults.active("nan", s) for s in range(1, 6)] == [False, False, True, True, False]
    assert not faults.active("raise", 2)  # rank 0 only
    assert torch.isnan(faults.poison(torch.ones(2), 3)).all() and torch.equal(faults.poison(torch.ones(2), 5),
                                                                               torch.ones(2))
    assert calls == ["nan:3-4,raise:2:0"]
    monkeypatch.setenv(faults.ENV, "raise:2")  # a new value is read
    with pytest.raises(RuntimeError, match="injected fault"):
        faults.mid_step(2)
    monkeypatch.delenv(faults.ENV)
    assert not faults.active("raise", 2)
    faults._parsed.cache_clear()
