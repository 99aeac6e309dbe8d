"""agents/losses.py against values worked out by hand: the policy and value losses and their clip fractions, the
loss aggregation (token mean, sequence mean, Dr. GRPO's constant), clip-higher and the KL estimators."""

import math

import pytest
import torch

from agents.losses import aggregate, aggregation_size, kl_estimate, policy_loss, value_loss

LN2 = math.log(2)


# --------------------------------------------------------------------------- the policy and value losses
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


def test_value_clipfrac_counts_no_float_ties_inside_the_range():
    # inside the clip range V_old + clamp(V - V_old) can differ from V by an ulp; that is not clipping
    values, old = torch.tensor([[0.20507400]]), torch.tensor([[0.07690925]])
    _, stats = value_loss(values, old, torch.tensor([[0.45358694]]), torch.ones(1, 1, dtype=torch.bool), 0.2)
    assert stats["ppo/value_clipfrac"].item() == 0.0


# --------------------------------------------------------------------------- aggregation
# two sequences: the first has 3 valid tokens 1, 2, 3; the second 1 valid token, 4 (the 100s are padding)
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
MASK = torch.tensor([[True, True, True], [True, False, False]])


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),  # 2.5
        ("sequence_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # (2 + 4) / 2 = 3
        ("constant", (1 + 2 + 3 + 4) / (2 * 4)),  # 2 sequences x L = 4: 1.25
    ],
)
def test_aggregate_hand_values(aggregation, expected):
    assert aggregate(VALUES, MASK, aggregation, max_new_tokens=4).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "aggregation, expected",
    [("token_mean", 6 / 3), ("sequence_mean", 2 / 1), ("constant", 6 / (1 * 4))],
)
def test_a_sequence_without_valid_tokens_counts_in_no_denominator(aggregation, expected):
    mask = torch.tensor([[True, True, True], [False, False, False]])  # the second sequence filtered out
    assert aggregate(VALUES, mask, aggregation, max_new_tokens=4).item() == pytest.approx(expected)


def test_constant_aggregation_needs_max_new_tokens():
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate(VALUES, MASK, "constant")


@pytest.mark.parametrize(
    "aggregation, expected",
    [("token_mean", -2.5), ("sequence_mean", -3.0), ("constant", -1.25)],
)
def test_policy_loss_at_ratio_one_is_minus_the_aggregated_advantage(aggregation, expected):
    # ratio 1: max(-A, -A clip(1)) = -A per token; aggregated as in test_aggregate_hand_values
    logprobs = torch.full_like(VALUES, -1.0)
    loss, _ = policy_loss(logprobs, logprobs, VALUES, MASK, 0.2, aggregation=aggregation, max_new_tokens=4)
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_micro_batches_weighted_by_their_size_give_the_minibatch_aggregate(aggregation):
    values = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    whole = aggregate(values, mask, aggregation, max_new_tokens=4)
    total = aggregation_size(mask, aggregation)
    for splits in ([2, 3], [1, 1, 1, 1, 1], [4, 1]):
        parts = zip(values.split(splits), mask.split(splits))
        accumulated = sum(aggregate(v, m, aggregation, 4) * aggregation_size(m, aggregation) / total for v, m in parts)
        torch.testing.assert_close(accumulated, whole)


# --------------------------------------------------------------------------- clip-higher
def test_clip_higher_hand_values():
    # eps_low 0.2, eps_high 0.28: the ratio is clipped to [0.8, 1.28]
    # r=1.25 A=+1: max(-1.25, -1.25) = -1.25, not clipped (symmetric: max(-1.25, -1.2) = -1.2, clipped)
    # r=1.25 A=-1: max(1.25, 1.25)   = 1.25                (symmetric: max(1.25, 1.2) = 1.25)
    # r=0.75 A=-1: max(0.75, 0.8)    = 0.8, clipped        (symmetric: the same)
    # r=0.7  A=+1: max(-0.7, -0.8)   = -0.7                (symmetric: the same)
    # r=1.3  A=+1: max(-1.3, -1.28)  = -1.28, clipped      (symmetric: max(-1.3, -1.2) = -1.2, clipped)
    ratio = torch.tensor([[1.25, 1.25, 0.75, 0.7, 1.3]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones_like(ratio, dtype=torch.bool)
    old = torch.zeros_like(ratio)
    loss, stats = policy_loss(ratio.log(), old, advantages, mask, 0.2, clip_range_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 1.25 + 0.8 - 0.7 - 1.28) / 5)
    assert stats["ppo/clipfrac"].item() == pytest.approx(2 / 5)
    symmetric, symmetric_stats = policy_loss(ratio.log(), old, advantages, mask, 0.2)
    assert symmetric.item() == pytest.approx((-1.2 + 1.25 + 0.8 - 0.7 - 1.2) / 5)
    assert symmetric_stats["ppo/clipfrac"].item() == pytest.approx(3 / 5)


# --------------------------------------------------------------------------- KL estimators
# log r = ref_logprobs - logprobs = ln 2, 0, -ln 2 (r = 2, 1, 1/2); a fourth, masked token of junk
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
REF_LOGPROBS = torch.tensor([[-1.0 + LN2, -2.0, -0.5 - LN2, 0.0]])
KL_MASK = torch.tensor([[True, True, True, False]])


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [-LN2, 0.0, LN2]),  # -log r
        ("k2", [LN2**2 / 2, 0.0, LN2**2 / 2]),  # (log r)^2 / 2
        ("k3", [(2 - 1) - LN2, 0.0, (0.5 - 1) + LN2]),  # (r - 1) - log r
    ],
)
def test_kl_estimators_hand_values(estimator, expected):
    estimate = kl_estimate(LOGPROBS[:, :3], REF_LOGPROBS[:, :3], estimator)
    torch.testing.assert_close(estimate, torch.tensor([expected]))
