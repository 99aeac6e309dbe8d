"""Fixtures several agents test files share: lockstep envs of the default task, and a rollout of episodes of
several turns with the agent that sampled it."""

import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.policy import ActorCritic
from agents.rollout import collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR
from textenv.turns import Reply, Turn

MULTI_TURN_KL_COEF = 0.05  # test_rollout.py and test_ppo.py name it KL_COEF


@pytest.fixture(scope="module")
def env(make_vec):
    """Eight envs of the default task in lockstep (rollouts reset every row together), 12 new tokens each."""
    return make_vec(8, autoreset_mode=AutoresetMode.DISABLED, max_new_tokens=12)


class Talk:
    """Two agent turns: a reply of 1-3 tokens after the first, turn rewards 0.5 then 1.0."""

    def respond(self, turn: Turn) -> Reply:
        if turn.index == 0:
            return Reply(text=[" and", " but the", " very good and"][len(turn.context_ids) % 3], reward=0.5)
        return Reply(done=True, reward=1.0)


@pytest.fixture(scope="module")
def multi_turn_rollout_and_agent():
    """Eight episodes of two agent turns (``Talk`` replies between them) and the agent that sampled them."""
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    config = TokenEnvConfig(
        interaction=Talk(), max_new_tokens=14, max_turns=2, max_env_tokens=4, kl_coef=MULTI_TURN_KL_COEF
    )
    env = make_rollout_env(8, config)
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    return rollout, agent
