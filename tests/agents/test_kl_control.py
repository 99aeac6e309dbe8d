"""agents/kl_control.py: the adaptive KL controller moves beta towards its target; the fixed one keeps it."""

import pytest

from agents.kl_control import AdaptiveKLController, FixedKLController


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    high = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    high.update(kl=100.0, n_steps=10)  # error clipped to +0.2: beta *= 1 + 0.2 * 10 / 100
    assert high.value == pytest.approx(0.1 * 1.02)
    low = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    low.update(kl=0.5, n_steps=10)  # error -0.5 clipped to -0.2
    assert low.value == pytest.approx(0.1 * 0.98)
    near = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    near.update(kl=1.1, n_steps=10)  # error 0.1, inside the clip
    assert near.value == pytest.approx(0.1 * 1.01)
    fixed = FixedKLController(0.1)
    fixed.update(kl=100.0, n_steps=10)
    assert fixed.value == 0.1
