"""The learner on episodes of several turns: the environment's tokens are context, never steps.

A rollout's columns hold every token after the prompt; the environment's are marked
by ``env_mask``. They must carry no log-prob, reward, KL or loss; the agent's own
log-probs (sampled with its KV cache fed the environment's tokens) must equal a
teacher-forced forward over the whole context; GAE must run over the agent's steps
only; and turn rewards must sit on the last agent token of each turn.
"""

import pytest
import torch

from agents.advantages import compute_gae
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, Targets, agent_steps, gae, micro_batch_loss, score_rollout
from agents.rollout import collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR
from textenv.turns import Reply, Turn

KL_COEF = 0.05


class Talk:
    """Two agent turns: a reply of 1-3 tokens after the first, turn rewards 0.5 then 1.0."""

    def respond(self, turn: Turn) -> Reply:
        if turn.index == 0:
            return Reply(text=[" and", " but the", " very good and"][len(turn.context_ids) % 3], reward=0.5)
        return Reply(done=True, reward=1.0)


@pytest.fixture(scope="module")
def rollout_and_agent():
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    config = TokenEnvConfig(interaction=Talk(), max_new_tokens=14, max_turns=2, max_env_tokens=4, kl_coef=KL_COEF)
    env = make_rollout_env(8, config)
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    return rollout, agent


def test_environment_tokens_are_columns_without_steps(rollout_and_agent):
    rollout, _ = rollout_and_agent
    assert rollout.env_mask is not None and rollout.env_mask.any()
    assert not (rollout.mask & rollout.env_mask).any()
    for name in ("logprobs", "rewards", "kl", "ref_logprobs"):
        assert (getattr(rollout, name)[rollout.env_mask] == 0).all(), name
    # the attention mask covers prompt, agent and environment tokens, and nothing after the episode
    context = rollout.mask | rollout.env_mask
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_ids.shape[1] :].bool(), context)


def test_sampled_logprobs_equal_a_forward_over_the_whole_context(rollout_and_agent):
    rollout, agent = rollout_and_agent
    with torch.no_grad():
        scored = score_rollout(agent, rollout, 1.0)
    torch.testing.assert_close(scored.logprobs[rollout.mask], rollout.logprobs[rollout.mask], atol=1e-5, rtol=0)
    # the env's KL is the sampling log-prob minus the reference's: the same numbers on the agent's tokens
    torch.testing.assert_close(rollout.kl[rollout.mask], (rollout.logprobs - rollout.ref_logprobs)[rollout.mask])


def test_turn_rewards_sit_on_the_last_agent_token_of_each_turn(rollout_and_agent):
    rollout, _ = rollout_and_agent
    eos = 2
    for row in range(len(rollout.actions)):
        kl_terms = -KL_COEF * rollout.kl[row]
        extra = (rollout.rewards[row] - kl_terms)[rollout.mask[row]]
        actions = rollout.actions[row][rollout.mask[row]]
        ended_turns = (actions == eos).nonzero()[:, 0].tolist()
        expected = torch.zeros_like(extra)
        for turn, column in enumerate(ended_turns):
            expected[column] += 0.5 if turn == 0 else 1.0
        if rollout.terminated[row]:
            expected[-1] += rollout.scores[row]
        else:  # truncated: a turn cut at max_new_tokens; the score on the last step
            expected[-1] += rollout.scores[row]
        torch.testing.assert_close(extra, expected, atol=1e-5, rtol=0)


def test_gae_runs_over_agent_steps_only():
    """Hand example: agent, env, env, agent, agent (end). Compacted, it is ordinary GAE over three steps, and
    the second step's next value is the value before the third agent token (after the reply)."""
    mask = torch.tensor([[True, False, False, True, True, False]])
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 9.0, 9.0, 0.3, 0.4, 9.0, 9.0]])  # V before each column; 9: never used
    terminated = torch.tensor([[False, False, False, False, True, False]])
    config = PPOConfig(gamma=0.9, lam=0.8)
    advantages, returns = gae(rewards, values, terminated, mask, config)
    compact_adv, _ = compute_gae(
        torch.tensor([[1.0, 0.5, 2.0]]),
        torch.tensor([[0.1, 0.3, 0.4]]),
        torch.tensor([[0.3, 0.4, 9.0]]),
        torch.tensor([[False, False, True]]),
        torch.ones(1, 3, dtype=torch.bool),
        0.9,
        0.8,
    )
    # by hand: delta = (1 + 0.9*0.3 - 0.1, 0.5 + 0.9*0.4 - 0.3, 2 - 0.4) = (1.17, 0.56, 1.6)
    a3 = 1.6
    a2 = 0.56 + 0.9 * 0.8 * a3
    a1 = 1.17 + 0.9 * 0.8 * a2
    torch.testing.assert_close(advantages[0, mask[0]], torch.tensor([a1, a2, a3]))
    torch.testing.assert_close(advantages[0, mask[0]], compact_adv[0])
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    order, next_columns, steps = agent_steps(mask)
    assert order[0, :3].tolist() == [0, 3, 4] and next_columns[0, :3].tolist() == [3, 4, 5]


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_environment_tokens_get_no_gradient(rollout_and_agent, kl_penalty):
    rollout, agent = rollout_and_agent
    config = PPOConfig(kl_penalty=kl_penalty, kl_estimator="k3")
    scored = score_rollout(agent, rollout, 1.0)
    scored.logprobs.retain_grad()
    scored.entropy.retain_grad()
    scored.values.retain_grad()
    with torch.no_grad():
        old = score_rollout(agent, rollout, 1.0)
    advantages, returns = gae(rollout.rewards, old.values, rollout.terminated_steps, rollout.mask, config)
    targets = Targets(old.logprobs, old.values, rollout.ref_logprobs, advantages, returns, rollout.mask)
    config.ent_coef = 0.01
    loss, _ = micro_batch_loss(scored, targets, torch.arange(len(rollout.actions)), config, KL_COEF, None)
    loss.backward()
    for name in ("logprobs", "entropy"):
        grad = getattr(scored, name).grad
        assert (grad[rollout.env_mask] == 0).all() and grad[rollout.mask].abs().sum() > 0, name
    value_grad = scored.values.grad[:, :-1]
    assert (value_grad[rollout.env_mask] == 0).all() and value_grad[rollout.mask].abs().sum() > 0
