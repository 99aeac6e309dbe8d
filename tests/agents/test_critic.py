"""The critic's loss: on the scale of the returns' spread, and strong enough for a value head on the policy's trunk
to fit the returns (``normalize_value_loss``, ``vf_coef``, ``clip_range_value``; docs/design.md)."""

import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.advantages import explained_variance
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update, rescore, rollout_advantages
from agents.rollout import collect_rollout
from tests.agents.test_ppo import tiny_agent, tiny_rollout
from textenv.default_task import POLICY_DIR

LEARNING_CRITIC = {"vf_coef": 2.0, "clip_range_value": 1.0, "normalize_value_loss": True}  # docs/design.md


def first_value_loss(returns: list[float], **settings) -> float:
    """``loss/value`` of one step of one epoch over ``tiny_rollout(returns)``: the loss before any weight moved."""
    config = PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=4, **settings)
    agent = tiny_agent()
    torch.nn.init.zeros_(agent.value_head.weight)  # V = 0: the returns are the only scale in the loss
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.0)
    metrics = ppo_update(agent, optimizer, tiny_rollout(returns), config, 1.0, torch.Generator(), kl_coef=0.0)
    return metrics["loss/value"]


def test_the_value_loss_is_in_units_of_the_returns_variance():
    # with the value head at 0 the loss is 0.5 * mean(R^2) / Var(R): scaling the returns by 10 leaves it as it is
    returns = [1.0, -0.5, 2.0, 0.3]
    loss = first_value_loss(returns, vf_coef=0.0, normalize_value_loss=True)  # vf_coef weighs it, the log is the same
    assert first_value_loss([10 * r for r in returns], normalize_value_loss=True) == pytest.approx(loss, rel=1e-5)
    plain = first_value_loss(returns)
    assert first_value_loss([10 * r for r in returns]) == pytest.approx(100 * plain, 1e-5)


def test_returns_that_do_not_vary_leave_the_loss_plain():
    # lambda 1 and V = 0: every step's return is its episode's, 0.7 (lambda < 1 would discount the earlier steps')
    same = {"lam": 1.0}
    assert first_value_loss([0.7] * 4, normalize_value_loss=True, **same) == pytest.approx(
        first_value_loss([0.7] * 4, **same)
    )


def fitted_explained_variance(make_vec, updates: int, **settings) -> float:
    """Explained variance of a shared-trunk critic, from the default task's SFT policy, on a rollout of 64 episodes
    it was updated on ``updates`` times (Adam, the trainer's learning rate)."""
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR)
    env = make_vec(64, autoreset_mode=AutoresetMode.DISABLED)
    rollout = collect_rollout(agent.eval(), env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    config = PPOConfig(**settings)
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)
    for update in range(updates):
        generator = torch.Generator().manual_seed(update)
        ppo_update(agent.train(), optimizer, rollout, config, 1.0, generator, kl_coef=env.unwrapped.kl_coef)
    _, values = rescore(agent, rollout, [torch.arange(64)], 1.0, None)
    _, returns, mask = rollout_advantages(rollout, values, config, env.unwrapped.kl_coef)
    return explained_variance(values[:, :-1], returns, mask)


def test_a_shared_trunk_critic_fits_the_returns_it_was_trained_on(make_vec):
    # the value head on the actor's trunk, after 3 updates on one rollout: with the normalized loss, vf_coef 2 and
    # clip 1 it explains most of that rollout's returns (0.64 when written); with the defaults almost none (0.05)
    fitted = fitted_explained_variance(make_vec, updates=3, **LEARNING_CRITIC)
    before = fitted_explained_variance(make_vec, updates=3)
    assert fitted > 0.45, (fitted, before)
    assert before < 0.2, (fitted, before)
