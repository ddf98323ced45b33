"""EMA update, hand-worked."""
import pytest
import torch

from engine.models.ema import ema_update


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


def test_quantized_base_weights_are_skipped_and_adapters_move():
    """A 4-bit actor's EMA: the packed (uint8) base is the same frozen weights in both models and is left as it
    is (a float lerp on packed bytes would corrupt it); the floating-point adapters move."""

    def model(base: int, adapter: float) -> torch.nn.Module:
        m = torch.nn.Module()
        m.base = torch.nn.Parameter(torch.full((2,), base, dtype=torch.uint8), requires_grad=False)
        m.lora = torch.nn.Parameter(torch.full((2,), adapter))
        return m

    actor, ema = model(base=7, adapter=1.0), model(base=7, adapter=0.0)
    ema.base.data.fill_(200)  # were the packed bytes lerped, they would change
    ema_update(ema, actor, decay=0.5)
    # 0.5 * 0 + 0.5 * 1 = 0.5
    assert ema.lora.tolist() == [0.5, 0.5] and ema.base.tolist() == [200, 200]
