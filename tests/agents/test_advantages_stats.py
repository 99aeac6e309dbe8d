"""Statistics in agents/advantages.py against numbers worked out by hand."""

import math

import torch

from agents.advantages import explained_variance

# two episodes of two real steps each; the third column is padding with values that must not count
RETURNS = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
MASK = torch.tensor([[True, True, False], [True, True, False]])
# over the mask R = [1, 2, 3, 4]: mean 2.5, unbiased Var(R) = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3


def test_values_equal_to_returns_explain_everything():
    values = RETURNS.clone()
    values[:, 2] = 0.0  # off the mask: ignored
    assert explained_variance(values, RETURNS, MASK) == 1.0


def test_constant_values_explain_nothing():
    # R - c = [-1, 0, 1, 2] for c = 2: a shift, so Var(R - c) = Var(R) = 5/3 and 1 - (5/3) / (5/3) = 0
    values = torch.full_like(RETURNS, 2.0)
    assert math.isclose(explained_variance(values, RETURNS, MASK), 0.0, abs_tol=1e-6)


def test_partial_explanation():
    # V = [1, 1, 3, 3]: R - V = [0, 1, 0, 1], mean 0.5, Var = 4 * 0.25 / 3 = 1/3; 1 - (1/3) / (5/3) = 0.8
    values = torch.tensor([[1.0, 1.0, 7.0], [3.0, 3.0, 7.0]])
    assert math.isclose(explained_variance(values, RETURNS, MASK), 0.8, abs_tol=1e-6)


def test_zero_variance_returns_give_nan():
    returns = torch.tensor([[2.0, 2.0, 9.0], [2.0, 2.0, -9.0]])  # constant over the mask
    assert math.isnan(explained_variance(torch.zeros_like(returns), returns, MASK))
