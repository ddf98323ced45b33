"""EMA update, hand-worked."""
import pytest
import torch

from engine.ema import ema_update


def test_ema_update_hand_worked():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    ema_update(ema, model, decay=0.992)
    # 0.992 * 0 + 0.008 * 1 = 0.008
    assert ema.weight.item() == pytest.approx(0.008, rel=1e-5)
    ema_update(ema, model, decay=0.992)
    # 0.992 * 0.008 + 0.008 = 0.015936
    assert ema.weight.item() == pytest.approx(0.015936, rel=1e-5)
    assert model.weight.item() == 1.0


def test_bad_decay_is_refused():
    m = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="decay"):
        ema_update(m, m, decay=1.5)
