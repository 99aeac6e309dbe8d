"""The agent's pure math against values worked out by hand."""

import pytest
import torch

from agents.advantages import compute_gae, grpo_advantages, masked_mean, masked_whiten, rloo_advantages
from agents.kl_control import AdaptiveKLController, FixedKLController
from agents.losses import policy_loss, value_loss
from textenv.lm import entropy_from_logits

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


def test_policy_loss_hand_values():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1 and clip 0.2:
    # max(-A r, -A clip(r)) = max(-1.5,-1.2), max(-0.5,-0.8), max(1.5,1.2), max(0.5,0.8) = -1.2, -0.5, 1.5, 0.8
    # mean = 0.6 / 4 = 0.15; clipped on tokens 1 and 4 -> clipfrac 0.5. A fifth, masked token is ignored.
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 7.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = policy_loss(ratio.log(), torch.zeros_like(ratio), advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["ppo/clipfrac"].item() == pytest.approx(0.5)
    assert stats["ppo/ratio_mean"].item() == pytest.approx(1.0)
    # approx_kl = mean((r - 1) - log r)
    expected_kl = sum((r - 1) - torch.tensor(r).log().item() for r in (1.5, 0.5, 1.5, 0.5)) / 4
    assert stats["ppo/approx_kl"].item() == pytest.approx(expected_kl)


def test_value_loss_hand_values():
    # V=1.5, V_old=1.0, R=2.0: clip(V) = 1.2 -> max(0.25, 0.64) = 0.64 (clipped is worse: counted)
    # V=0.9, V_old=1.0, R=0.0: inside the clip range -> 0.81
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625
    values = torch.tensor([[1.5, 0.9, 3.0]])
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.3625)
    assert stats["ppo/value_clipfrac"].item() == pytest.approx(0.5)


def test_entropy_of_uniform_and_one_hot():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert entropy_from_logits(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


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


def test_value_clipfrac_counts_no_float_ties_inside_the_range():
    # inside the clip range V_old + clamp(V - V_old) can differ from V by an ulp; that is not clipping
    values, old = torch.tensor([[0.20507400]]), torch.tensor([[0.07690925]])
    _, stats = value_loss(values, old, torch.tensor([[0.45358694]]), torch.ones(1, 1, dtype=torch.bool), 0.2)
    assert stats["ppo/value_clipfrac"].item() == 0.0
