"""agents/advantages.py against values worked out by hand: GAE, masked statistics and explained variance, RLOO
and GRPO advantages, their scaling, and the groups whose returns are all equal."""

import math

import pytest
import torch

from agents.advantages import (
    compute_gae,
    equal_groups,
    explained_variance,
    group_centered,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    rloo_advantages,
    scale_advantages,
)

# --------------------------------------------------------------------------- GAE
GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72


def gae(rewards, values, next_values, terminated, mask):
    t = lambda x, dtype=torch.float64: torch.tensor([x], dtype=dtype)  # noqa: E731
    return compute_gae(
        t(rewards), t(values), t(next_values), t(terminated, torch.bool), t(mask, torch.bool), GAMMA, LAM
    )


def test_gae_last_step_reward_terminated_episode():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], EOS at t=2: no bootstrap.
    # delta_2 = 1 - 0.7 = 0.3                  A_2 = 0.3 (= r - V at the terminal step)
    # delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03       A_1 = 0.03 + 0.72*0.3 = 0.246
    # delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04       A_0 = 0.04 + 0.72*0.246 = 0.21712
    advantages, returns = gae([0, 0, 1], [0.5, 0.6, 0.7], [0.6, 0.7, 123.0], [False, False, True], [True] * 3)
    torch.testing.assert_close(advantages[0], torch.tensor([0.21712, 0.246, 0.3], dtype=torch.float64))
    torch.testing.assert_close(returns[0], torch.tensor([0.71712, 0.846, 1.0], dtype=torch.float64))


def test_gae_truncated_episode_bootstraps_from_the_next_value():
    # Same episode cut off at max_new_tokens: V(s_3) = 0.4 is used.
    # delta_2 = 1 + 0.9*0.4 - 0.7 = 0.66       A_2 = 0.66
    # A_1 = 0.03 + 0.72*0.66 = 0.5052          A_0 = 0.04 + 0.72*0.5052 = 0.403744
    advantages, _ = gae([0, 0, 1], [0.5, 0.6, 0.7], [0.6, 0.7, 0.4], [False] * 3, [True] * 3)
    torch.testing.assert_close(advantages[0], torch.tensor([0.403744, 0.5052, 0.66], dtype=torch.float64))


def test_gae_ignores_steps_after_the_end_of_a_shorter_episode():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.7, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4]])
    next_values = torch.tensor([[0.7, 9.0, 9.0, 9.0], [0.2, 0.3, 0.4, 0.0]])
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    terminated = torch.tensor([[False, True, False, False], [False, False, False, True]])
    advantages, returns = compute_gae(rewards, values, next_values, terminated, mask, GAMMA, LAM)
    # row 0: A_1 = 1 - 0.7 = 0.3; A_0 = (0.9*0.7 - 0.5) + 0.72*0.3 = 0.13 + 0.216 = 0.346; the 9s never enter
    torch.testing.assert_close(advantages[0], torch.tensor([0.346, 0.3, 0.0, 0.0]))
    assert returns[0, 2:].eq(0).all()
    # the terminal step's advantage is r - V(s)
    assert advantages[1, 3].item() == pytest.approx(1.0 - 0.4)


def test_gae_rejects_mismatched_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="share one"):
        compute_gae(x, x, torch.zeros(2, 4), x.bool(), x.bool(), 1.0, 0.95)


# --------------------------------------------------------------------------- masked statistics
def test_masked_mean_and_whiten_use_only_the_mask():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.5)
    whitened = masked_whiten(values, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    # unbiased std over the 4 valid entries is 1
    assert whitened[mask].std().item() == pytest.approx(1.0, abs=1e-4)
    assert whitened[~mask].eq(0).all()
    scaled = masked_whiten(values, mask, shift_mean=False)  # unit std, the mean kept (TRL's reward whitening)
    assert masked_mean(scaled, mask).item() == pytest.approx(2.5)
    assert scaled[mask].std().item() == pytest.approx(1.0, abs=1e-4)


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


# --------------------------------------------------------------------------- group advantages
def test_rloo_advantages_for_a_group_of_four():
    # returns 1, 2, 3, 6: leave-one-out baselines 11/3, 10/3, 9/3, 6/3
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rloo_advantages(returns, 4), expected)


def test_grpo_advantages_for_a_group_of_four():
    # mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3)
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0])
    std = (14 / 3) ** 0.5
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4)
    torch.testing.assert_close(grpo_advantages(returns, 4), expected)
    # a group whose returns are all equal carries no signal
    assert grpo_advantages(torch.full((4,), 2.5), 4).eq(0).all()


@pytest.mark.parametrize("returns, k", [(torch.zeros(6), 4), (torch.zeros(4), 1), (torch.zeros(2, 4), 4)])
def test_group_advantages_reject_bad_groups(returns, k):
    with pytest.raises(ValueError, match="groups of k >= 2"):
        rloo_advantages(returns, k)


# two groups of two: returns (1, 3) and (0, 4)
GROUP_RETURNS = torch.tensor([1.0, 3.0, 0.0, 4.0])


def test_advantage_scaling_hand_values():
    centered = group_centered(GROUP_RETURNS, 2)  # minus the group means 2 and 2
    torch.testing.assert_close(centered, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    # group: unbiased stds sqrt((1 + 1) / 1) = sqrt(2) and sqrt((4 + 4) / 1) = 2 sqrt(2)
    group_std = torch.tensor([2**0.5, 2**0.5, 8**0.5, 8**0.5])
    torch.testing.assert_close(scale_advantages(centered, GROUP_RETURNS, 2, "group"), centered / (group_std + 1e-4))
    # batch: mean 0, unbiased variance (1 + 1 + 4 + 4) / 3 = 10 / 3
    expected = centered / ((10 / 3) ** 0.5 + 1e-4)
    torch.testing.assert_close(scale_advantages(centered, GROUP_RETURNS, 2, "batch"), expected)
    assert scale_advantages(centered, GROUP_RETURNS, 2, "none") is centered
    # batch over the valid episodes only: (-1, 1) have unbiased std sqrt(2)
    valid = torch.tensor([True, True, False, False])
    halves = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(scale_advantages(halves, GROUP_RETURNS, 2, "batch", valid), halves / (2**0.5 + 1e-4))
    # RLOO: R_i minus the other one's return: (-2, 2, -4, 4); over the group's std: -sqrt(2), sqrt(2), ...
    loo = rloo_advantages(GROUP_RETURNS, 2)
    root2 = 2 / (2**0.5 + 1e-4)
    expected = torch.tensor([-root2, root2, -4 / (8**0.5 + 1e-4), 4 / (8**0.5 + 1e-4)])
    torch.testing.assert_close(scale_advantages(loo, GROUP_RETURNS, 2, "group"), expected)


def test_equal_groups():
    returns = torch.tensor([1.0, 1.0 + 1e-7, 0.0, 1.0, 2.0, 2.0])
    torch.testing.assert_close(equal_groups(returns, 2), torch.tensor([True, True, False, False, True, True]))
