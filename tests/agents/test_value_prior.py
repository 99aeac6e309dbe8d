"""The critic's value prior: V(s) = head(h(s)) + w * score(s), score(s) the reward model's score of the state's
prefix (``ActorCritic.value_prior``, ``--value-prior``; docs/design.md).

What each piece must do: the rollout holds, for each value, the uncached score of the prefix it is read at; the
update's values add ``prior_weight`` times it, packed or not; the weight is saved with the head, trained at
``PRIOR_LR_SCALE`` times the rate, and resumed; a run takes the prior by default where it applies and refuses it,
named, where it cannot.
"""

import pytest
import torch
from gymnasium.vector import AutoresetMode
from safetensors.torch import load_file

from agents.policy import PRIOR_WEIGHT_KEY, VALUE_HEAD_FILE, ActorCritic
from agents.ppo import PPOConfig, score_rollout
from agents.rollout import collect_rollout
from agents.train import LR_SCALE, PRIOR_LR_SCALE, RunConfig, TrainConfig, Trainer, parameter_groups, train
from tests.agents.test_ppo import tiny_agent, tiny_rollout
from tests.agents.test_train import tiny_config
from tests.models import uncached_score
from textenv.default_task import POLICY_DIR


@pytest.fixture(scope="module")
def prior_rollout(env):
    """Eight episodes of the default task sampled by an agent whose critic has a value prior, with the agent."""
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR, value_prior=True).eval()
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    return rollout, agent


def test_each_value_reads_the_uncached_score_of_its_prefix(prior_rollout, env):
    rollout, _ = prior_rollout
    reward_model = env.unwrapped.reward_model
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask.bool()
    steps = rollout.mask.shape[1]
    assert rollout.value_prior.shape == (8, steps + 1)
    for row in range(8):
        prompt = prompt_ids[row][prompt_mask[row]].tolist()
        actions = rollout.actions[row][rollout.mask[row]].tolist()
        expected = [uncached_score(reward_model, prompt + actions[:t]) for t in range(len(actions))]
        got = rollout.value_prior[row, : len(actions)]
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0, msg=f"row {row}")
        # after the last step the score has been paid: nothing of it is still to come (a cut episode's bootstrap)
        assert (rollout.value_prior[row, len(actions) :] == 0).all()
    assert rollout.value_prior[:, 0].std() > 0.01  # the prompts' scores differ: a real feature


def test_a_cut_episodes_bootstrap_does_not_count_its_score_again(make_vec):
    """Responses cut at max_new_tokens bootstrap from V(s_T); the env paid the score of s_T's prefix on the last
    step, so the prior adds nothing there: the bootstrap is the head's alone."""
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR, value_prior=True).eval()
    env = make_vec(8, autoreset_mode=AutoresetMode.DISABLED, max_new_tokens=3)
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    assert rollout.truncated.sum() >= 4
    assert (rollout.value_prior[:, 3] == 0).all() and (rollout.value_prior[:, :3] != 0).all()
    with torch.no_grad():
        values = score_rollout(agent, rollout, 1.0).values
        plain = ActorCritic(agent.policy, value_layer=agent.value_layer)
        torch.testing.assert_close(values[:, 3], score_rollout(plain, rollout, 1.0).values[:, 3])


@pytest.mark.parametrize("pack", [False, True])
def test_the_values_add_the_prior_weight_times_the_prefix_score(prior_rollout, pack):
    rollout, agent = prior_rollout
    with torch.no_grad():
        agent.value_head.weight.normal_(0, 0.1)  # a head that predicts something of its own
        agent.prior_weight.fill_(0.7)
        plain = ActorCritic(agent.policy, value_layer=agent.value_layer)
        plain.value_head.load_state_dict(agent.value_head.state_dict())
        with_prior = score_rollout(agent, rollout, 1.0, pack=pack).values
        head_alone = score_rollout(plain, rollout, 1.0, pack=pack).values
    valid = torch.cat([torch.ones(8, 1, dtype=torch.bool), rollout.mask], 1)
    torch.testing.assert_close(with_prior[valid], (head_alone + 0.7 * rollout.value_prior)[valid], atol=1e-5, rtol=0)
    assert (with_prior[valid] - head_alone[valid]).abs().max() > 0.1


def test_the_prior_weight_gets_the_value_losss_gradient():
    rollout = tiny_rollout([1.0, -0.5, 2.0, 0.3])
    agent = tiny_agent()
    agent.add_value_prior()
    rollout = rollout._replace(value_prior=torch.linspace(-1, 1, 16).view(4, 4))
    values = score_rollout(agent, rollout, 1.0).values
    values[:, :-1][rollout.mask].square().sum().backward()
    assert agent.prior_weight.grad is not None and agent.prior_weight.grad.abs() > 0


def test_a_critic_with_a_prior_refuses_a_rollout_without_one_and_one_without_refuses_a_prior():
    rollout = tiny_rollout([1.0, -0.5, 2.0, 0.3])
    agent = tiny_agent()
    agent.add_value_prior()
    with pytest.raises(ValueError, match="the rollout has none: collect it with agents.rollout.collect_rollout"):
        score_rollout(agent, rollout, 1.0)
    plain = tiny_agent()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="value_prior was given to an agent whose critic has none"):
        plain(ids, None, torch.arange(3).expand(2, 3), value_prior=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="has a value prior already"):
        agent.add_value_prior()


def test_the_prior_weight_is_saved_and_loaded_with_the_head(tmp_path):
    agent = ActorCritic.from_models(POLICY_DIR, value_prior=True)
    with torch.no_grad():
        agent.prior_weight.fill_(0.625)
    agent.save_pretrained(tmp_path / "with")
    assert float(load_file(tmp_path / "with" / VALUE_HEAD_FILE)[PRIOR_WEIGHT_KEY]) == 0.625
    loaded = ActorCritic.from_pretrained(tmp_path / "with")
    assert loaded.value_prior and loaded.prior_weight.item() == 0.625
    assert any(p is loaded.prior_weight for p in loaded.parameters())  # trained with the rest
    ActorCritic.from_models(POLICY_DIR).save_pretrained(tmp_path / "without")
    assert PRIOR_WEIGHT_KEY not in load_file(tmp_path / "without" / VALUE_HEAD_FILE)
    assert not ActorCritic.from_pretrained(tmp_path / "without").value_prior


def test_the_prior_weight_learns_at_prior_lr_scale_times_the_rate():
    agent = tiny_agent()
    agent.add_value_prior()
    groups = parameter_groups(agent, agent, value_lr_scale=1.0)
    assert [g[LR_SCALE] for g in groups] == [1.0, PRIOR_LR_SCALE]
    assert groups[1]["params"] == [agent.prior_weight]
    assert sum(len(g["params"]) for g in groups) == len(list(agent.parameters()))
    groups = parameter_groups(agent, agent, value_lr_scale=3.0)
    assert [g[LR_SCALE] for g in groups] == [1.0, 3.0, PRIOR_LR_SCALE]
    assert groups[1]["params"] == list(agent.value_head.parameters())
    assert parameter_groups(tiny_agent(), tiny_agent(), 1.0)[0].keys() == {"params"}  # no prior: one group


def run_config(run_dir, **run) -> TrainConfig:
    config = tiny_config(run_dir)
    config.run.iterations = 2  # iteration 1 at half the rate (the last of 1 would have none)
    for key, value in run.items():
        setattr(config.run, key, value)
    return config


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, True),  # a critic on the policy's trunk, a reward model of the policy's tokens: the default
        ({"share_backbone": False}, False),  # a separate critic starts from the reward model's trunk already
        ({"share_backbone": False, "value_prior": "score"}, True),
        ({"value_prior": "none"}, False),
    ],
)
def test_a_new_run_takes_the_prior_where_it_applies(tmp_path, settings, expected):
    trainer = Trainer(run_config(tmp_path / "run", **settings))
    try:
        assert trainer.agent.value_prior is expected
        if expected:
            metrics, _ = trainer.iterate(1)
            assert metrics["ppo/prior_weight"] != 1.0  # trained
    finally:
        trainer.logger.close()


def test_a_task_without_a_reward_model_has_no_prior_and_refuses_one(tmp_path):
    config = tiny_config(tmp_path / "run", task="arithmetic")
    trainer = Trainer(config)
    trainer.logger.close()
    assert not trainer.agent.value_prior
    config = tiny_config(tmp_path / "refused", task="arithmetic")
    config.run.value_prior = "score"
    with pytest.raises(ValueError, match="--value-prior score: this env has no reward model"):
        Trainer(config)
    assert not (tmp_path / "refused").exists()


def test_dense_rewards_and_critic_free_algorithms_refuse_the_prior(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "dense", reward_mode="dense"))
    trainer.logger.close()
    assert not trainer.agent.value_prior  # None: not where the rewards pay each prefix already
    config = tiny_config(tmp_path / "dense_score", reward_mode="dense")
    config.run.value_prior = "score"
    with pytest.raises(ValueError, match="already pay each prefix's score"):
        Trainer(config)
    with pytest.raises(ValueError, match="--algo grpo has none"):
        TrainConfig(ppo=PPOConfig(algo="grpo"), run=RunConfig(value_prior="score"))


def test_a_resumed_run_keeps_the_prior_and_its_weight(tmp_path):
    config = run_config(tmp_path / "run")
    config.run.iterations, config.run.checkpoint_every = 2, 1
    train(config)
    head = load_file(tmp_path / "run" / "final" / VALUE_HEAD_FILE)
    resumed = run_config(tmp_path / "run", resume=True)
    resumed.run.iterations, resumed.run.checkpoint_every = 3, 1
    trainer = Trainer(resumed)
    trainer.logger.close()
    assert trainer.agent.value_prior
    assert trainer.agent.prior_weight.item() == head[PRIOR_WEIGHT_KEY].item() != 1.0
    assert [g[LR_SCALE] for g in trainer.optimizer.param_groups] == [1.0, PRIOR_LR_SCALE]
