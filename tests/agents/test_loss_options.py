"""The update's loss and advantage options against values worked out by hand, and against gradient accumulation.

Loss aggregation (token mean, sequence mean, Dr. GRPO's constant), group advantage scaling,
clip-higher, the KL estimators and their placement, and the filter of groups whose returns
are all equal. The update itself runs on a one-layer GPT-2 of width 8 over 16 tokens: CPU, no downloads.
"""

import copy
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from agents.advantages import equal_groups, group_centered, rloo_advantages, scale_advantages
from agents.losses import aggregate, aggregation_size, kl_estimate, policy_loss
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, Scored, Targets, micro_batch_loss, ppo_update, rollout_advantages, swap_kl_estimator
from agents.rollout import Rollout
from tests.models import tiny_gpt2_config

LN2 = math.log(2)

# ---------------------------------------------------------------- aggregation

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


# ---------------------------------------------------------------- clip-higher


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


# ---------------------------------------------------------------- KL estimators and placement

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


@pytest.mark.parametrize(
    "estimator, expected_kl", [("k2", [LN2**2 / 2, 0.0, LN2**2 / 2]), ("k3", [1 - LN2, 0.0, LN2 - 0.5])]
)
def test_kl_in_the_reward_swaps_k1_for_the_estimator(estimator, expected_kl):
    beta, score = 0.5, 1.0
    kl = torch.where(KL_MASK, LOGPROBS - REF_LOGPROBS, 0.0)  # k1 = log pi - log pi_ref = -ln 2, 0, ln 2
    env_rewards = torch.tensor([[-beta * -LN2, 0.0, -beta * LN2 + score, 0.0]])  # what the env paid
    rewards = swap_kl_estimator(env_rewards, kl, LOGPROBS, REF_LOGPROBS, KL_MASK, beta, estimator)
    expected = [-beta * expected_kl[0], -beta * expected_kl[1], -beta * expected_kl[2] + score, 0.0]
    torch.testing.assert_close(rewards, torch.tensor([expected]))


def test_kl_in_the_loss_has_the_gradient_of_k3():
    # loss = beta * mean_t k3_t over the 3 valid tokens; zero advantages, so the policy term adds no gradient.
    # d k3 / d logp = d/dlogp [(exp(ref - logp) - 1) - (ref - logp)] = 1 - exp(ref - logp) = 1 - r
    # r = 2, 1, 1/2: gradient beta / 3 * (-1, 0, 1/2); mean k3 = ((1 - ln 2) + 0 + (ln 2 - 1/2)) / 3 = 1/6
    beta = 0.5
    logprobs = LOGPROBS.clone().requires_grad_()
    scored = Scored(logprobs=logprobs, values=torch.zeros(1, 5), entropy=torch.zeros(1, 4))
    zeros = torch.zeros(1, 4)
    targets = Targets(LOGPROBS.clone(), torch.zeros(1, 5), REF_LOGPROBS, zeros, zeros, KL_MASK)
    config = PPOConfig(algo="grpo", kl_penalty="loss", kl_estimator="k3")
    loss, stats = micro_batch_loss(scored, targets, torch.tensor([0]), config, kl_coef=beta, max_new_tokens=None)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-beta / 3, 0.0, beta / 3 * 0.5, 0.0]]))
    assert stats["loss/kl"].item() == pytest.approx(1 / 6)
    assert stats["ppo/kl_in_loss"].item() == pytest.approx(beta / 6)
    assert loss.item() == pytest.approx(beta / 6)


# ---------------------------------------------------------------- group advantages

# two groups of two: returns (1, 3) and (0, 4)
RETURNS = torch.tensor([1.0, 3.0, 0.0, 4.0])


def test_advantage_scaling_hand_values():
    centered = group_centered(RETURNS, 2)  # minus the group means 2 and 2
    torch.testing.assert_close(centered, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    # group: unbiased stds sqrt((1 + 1) / 1) = sqrt(2) and sqrt((4 + 4) / 1) = 2 sqrt(2)
    group_std = torch.tensor([2**0.5, 2**0.5, 8**0.5, 8**0.5])
    torch.testing.assert_close(scale_advantages(centered, RETURNS, 2, "group"), centered / (group_std + 1e-4))
    # batch: mean 0, unbiased variance (1 + 1 + 4 + 4) / 3 = 10 / 3
    expected = centered / ((10 / 3) ** 0.5 + 1e-4)
    torch.testing.assert_close(scale_advantages(centered, RETURNS, 2, "batch"), expected)
    assert scale_advantages(centered, RETURNS, 2, "none") is centered
    # batch over the valid episodes only: (-1, 1) have unbiased std sqrt(2)
    valid = torch.tensor([True, True, False, False])
    halves = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(scale_advantages(halves, RETURNS, 2, "batch", valid), halves / (2**0.5 + 1e-4))
    # RLOO: R_i minus the other one's return: (-2, 2, -4, 4); over the group's std: -sqrt(2), sqrt(2), ...
    loo = rloo_advantages(RETURNS, 2)
    root2 = 2 / (2**0.5 + 1e-4)
    expected = torch.tensor([-root2, root2, -4 / (8**0.5 + 1e-4), 4 / (8**0.5 + 1e-4)])
    torch.testing.assert_close(scale_advantages(loo, RETURNS, 2, "group"), expected)


def test_advantage_scaling_defaults_to_the_algorithms_own():
    assert PPOConfig(algo="grpo").group_scaling == "group"
    assert PPOConfig(algo="rloo").group_scaling == "none"
    assert PPOConfig(algo="rloo", advantage_scaling="batch").group_scaling == "batch"


def test_equal_groups():
    returns = torch.tensor([1.0, 1.0 + 1e-7, 0.0, 1.0, 2.0, 2.0])
    torch.testing.assert_close(equal_groups(returns, 2), torch.tensor([True, True, False, False, True, True]))


# ---------------------------------------------------------------- a hand-made rollout and a tiny agent

LENGTHS = [3, 2, 1, 3]  # four episodes in two groups of two


def tiny_rollout(returns, seed=0) -> Rollout:
    """Four episodes of LENGTHS steps after a 2-token prompt; each return paid on the last step."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[step < n for step in range(3)] for n in LENGTHS])
    actions = torch.where(mask, torch.randint(3, 16, (4, 3), generator=gen), 0)
    rewards = torch.zeros(4, 3)
    rewards[torch.arange(4), torch.tensor(LENGTHS) - 1] = torch.tensor(returns)
    ref_logprobs = torch.where(mask, -2.5 + 0.3 * torch.randn(4, 3, generator=gen), 0.0)
    logprobs = torch.where(mask, ref_logprobs + 0.2 * torch.randn(4, 3, generator=gen), 0.0)
    return Rollout(
        prompt_ids=torch.randint(3, 16, (4, 2), generator=gen),
        prompt_mask=torch.ones(4, 2, dtype=torch.long),
        actions=actions,
        logprobs=logprobs,
        rewards=rewards,
        mask=mask,
        terminated=torch.tensor([True, True, True, False]),
        truncated=torch.tensor([False, False, False, True]),
        scores=torch.tensor(returns),
        kl=logprobs - ref_logprobs,
        ref_logprobs=ref_logprobs,
        prompts=["a", "a", "b", "b"],
        responses=[""] * 4,
        reward_terms={},
    )


def test_filtered_groups_leave_the_mask_and_carry_no_advantage():
    # group (1, 1) is filtered; group (0, 1): centered -0.5, 0.5, group std sqrt(0.25 + 0.25) = sqrt(0.5)
    config = PPOConfig(algo="grpo", group_size=2, filter_equal_groups=True, whiten_advantages=False)
    rollout = tiny_rollout([1.0, 1.0, 0.0, 1.0])
    advantages, _, mask = rollout_advantages(rollout, torch.zeros(4, 4), config, kl_coef=0.0)
    torch.testing.assert_close(mask, rollout.mask & torch.tensor([False, False, True, True])[:, None])
    per_episode = 0.5 / (0.5**0.5 + 1e-4)
    expected = torch.tensor([[0.0] * 3, [0.0] * 3, [-per_episode, 0.0, 0.0], [per_episode] * 3])
    torch.testing.assert_close(advantages, expected)


def tiny_agent() -> ActorCritic:
    torch.manual_seed(0)
    agent = ActorCritic.from_models(GPT2LMHeadModel(tiny_gpt2_config(16)))
    with torch.no_grad():
        agent.value_head.weight.normal_()  # a critic that predicts something, so the value loss has a gradient
    return agent.train()


def update(agent, rollout, config, optimizer=None, kl_coef=0.0, **kwargs):
    optimizer = optimizer or torch.optim.SGD(agent.parameters(), lr=0.1)
    return ppo_update(
        agent, optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=kl_coef, **kwargs
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize(
    "options",
    [
        {"algo": "ppo"},
        {"algo": "grpo", "filter_equal_groups": True, "kl_penalty": "loss", "kl_estimator": "k3"},
        {"algo": "rloo", "kl_estimator": "k2", "advantage_scaling": "batch", "clip_range_high": 0.28},
    ],
)
def test_gradient_accumulation_equals_one_big_minibatch(aggregation, options):
    rollout = tiny_rollout([1.0, 1.0, 0.0, 1.0])  # with the filter on, the first group drops out
    agent = tiny_agent()
    results = []
    for micro in (4, 1, 2):
        clone = copy.deepcopy(agent)
        sizes = {"minibatch_size": 4, "micro_batch_size": micro, "max_grad_norm": 1e9}
        config = PPOConfig(**options, **sizes, group_size=2, epochs=1, loss_aggregation=aggregation)
        update(clone, rollout, config, kl_coef=0.1, max_new_tokens=3)
        results.append(dict(clone.named_parameters()))
    assert any(not torch.equal(p, results[0][name]) for name, p in agent.named_parameters())
    for result in results[1:]:
        for name, parameter in results[0].items():
            torch.testing.assert_close(parameter, result[name], atol=1e-6, rtol=1e-5)


def test_an_update_whose_groups_are_all_filtered_takes_no_step():
    agent = tiny_agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2)
    config = PPOConfig(
        algo="grpo", group_size=2, epochs=2, minibatch_size=2, micro_batch_size=1, filter_equal_groups=True
    )
    first = update(agent, tiny_rollout([1.0, 0.0, 0.0, 1.0]), config, optimizer)  # Adam gathers momentum
    assert first["ppo/filtered_groups"] == 0.0 and first["ppo/idle_steps"] == 0
    before = copy.deepcopy(agent.state_dict())
    metrics = update(agent, tiny_rollout([1.0, 1.0, 0.5, 0.5]), config, optimizer)
    assert metrics["ppo/filtered_groups"] == 1.0
    assert metrics["ppo/idle_steps"] == metrics["ppo/steps"] == 4 and metrics["ppo/skipped_steps"] == 0
    assert all(torch.equal(value, before[key]) for key, value in agent.state_dict().items())
    assert all(math.isfinite(value) for value in metrics.values())


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"loss_aggregation": "sum"}, ValueError, "loss_aggregation"),
        ({"kl_estimator": "k4"}, ValueError, "kl_estimator"),
        ({"kl_penalty": "both"}, ValueError, "kl_penalty"),
        ({"algo": "grpo", "advantage_scaling": "prompt"}, ValueError, "advantage_scaling"),
        ({"clip_range_high": 0.0}, ValueError, "clip_range_high"),
        ({"clip_range_high": float("nan")}, ValueError, "clip_range_high"),
        ({"algo": "grpo", "filter_equal_groups": 1}, TypeError, "filter_equal_groups"),
        ({"algo": "ppo", "advantage_scaling": "group"}, ValueError, "advantage_scaling"),
        ({"algo": "ppo", "filter_equal_groups": True}, ValueError, "filter_equal_groups"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, error, match):
    with pytest.raises(error, match=match):
        PPOConfig(**options)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "max_new_tokens"),
        ({"max_new_tokens": 2}, "max_new_tokens"),  # the rollout took 3 steps
        ({"max_new_tokens": 3, "kl_coef": -0.1}, "kl_coef"),
    ],
)
def test_update_arguments_are_checked(kwargs, match):
    config = PPOConfig(loss_aggregation="constant")
    with pytest.raises(ValueError, match=match):
        update(tiny_agent(), tiny_rollout([1.0, 0.0, 0.0, 1.0]), config, **kwargs)


def test_the_kl_coefficient_is_a_required_keyword():
    """Forgotten, a default of 0 would silently drop the k2/k3 swap and the KL loss term."""
    agent = tiny_agent()
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="kl_coef"):
        ppo_update(agent, optimizer, tiny_rollout([1.0, 0.0, 0.0, 1.0]), PPOConfig(), 1.0, torch.Generator())
    with pytest.raises(TypeError):
        ppo_update(agent, optimizer, tiny_rollout([1.0, 0.0, 0.0, 1.0]), PPOConfig(), 1.0, torch.Generator(), None, 0.1)
