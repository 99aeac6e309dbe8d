"""The fast update (``agents.ppo.ppo_update``) against its one-page spec (``agents.ppo_reference``).

Both start from the same weights and take the same minibatches of one rollout: the fast
update on the agent as ``ActorCritic.from_models`` builds it (fused GELU), in
micro-batches, packed; the reference on the Hugging Face models as they load, whole
minibatches, padded. After K epochs of SGD steps every parameter must agree to float
rounding: the largest difference under ``TOLERANCE`` times the largest distance the update
moved a weight. SGD, not the trainer's Adam, so that a difference of gradients shows as a
proportional difference of weights: Adam divides each element's step by its own gradient's
size plus eps, which magnifies the rounding of a near-zero gradient up to lr / eps times.
"""

import copy

import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoModel, AutoModelForCausalLM

from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update
from agents.ppo_reference import ppo_update_reference
from agents.rollout import collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import disable_dropout
from textenv.turns import Reply, Turn

KL_COEF = 0.05  # the env's default: the beta its rewards were computed with
MAX_NEW_TOKENS = 12
TOLERANCE = 1e-4  # of the largest move; one rounding of a weight near 1 (1.2e-7) is about 2e-5 of it


def perturbed_agent(share_backbone: bool = True) -> ActorCritic:
    """The default task's policy, nudged off the env's reference model (so the KL is not 0), with a critic that
    predicts something (so the value loss has a gradient)."""
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=REWARD_MODEL_DIR)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in agent.policy.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        agent.value_head.weight.normal_(std=0.1, generator=generator)
    return agent.eval()


def plain_copy(agent: ActorCritic) -> ActorCritic:
    """``agent``'s weights in an ``ActorCritic`` of the models as they load (GPT-2's own ``gelu_new``)."""
    critic = None if agent.critic is None else AutoModel.from_pretrained(REWARD_MODEL_DIR)
    plain = ActorCritic(AutoModelForCausalLM.from_pretrained(POLICY_DIR), critic)
    plain.load_state_dict(agent.state_dict())
    disable_dropout(plain)
    assert plain.policy.config.activation_function == "gelu_new"
    return plain


def both_updates(agent: ActorCritic, rollout, config: PPOConfig, **kwargs) -> tuple[float, float]:
    """Run the fast update and the reference from ``agent``'s weights; (largest move, largest difference)."""
    start = {name: p.detach().clone() for name, p in agent.named_parameters()}
    ends = []
    for update, model in ((ppo_update, copy.deepcopy(agent)), (ppo_update_reference, plain_copy(agent))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        update(model.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), **kwargs)
        ends.append({name: p.detach() for name, p in model.named_parameters()})
    fast, reference = ends
    assert fast.keys() == reference.keys() == start.keys()
    moved = max(float((fast[name] - start[name]).abs().max()) for name in start)
    apart = max(float((fast[name] - reference[name]).abs().max()) for name in start)
    print(f"largest move {moved:.3g}, largest difference {apart:.3g} ({apart / moved:.2g} of the move)")
    return moved, apart


@pytest.fixture(scope="module")
def grouped_rollout(make_vec):
    """16 episodes, 4 prompts of 4 (groups for rloo and grpo; ppo reads them as 16 episodes)."""
    agent = perturbed_agent()
    env = make_vec(16, autoreset_mode=AutoresetMode.DISABLED, max_new_tokens=MAX_NEW_TOKENS, kl_coef=KL_COEF)
    rollout = collect_rollout(agent, env, 1.0, seed=5, generator=torch.Generator().manual_seed(5), group_size=4)
    assert rollout.terminated.any() and rollout.truncated.any() and rollout.kl[rollout.mask].abs().max() > 1e-3
    return rollout, agent


SIZES = dict(epochs=2, minibatch_size=8, micro_batch_size=4, group_size=4)


@pytest.mark.parametrize(
    "options",
    [
        {"algo": "ppo"},
        {"algo": "ppo", "loss_aggregation": "sequence_mean", "clip_range_high": 0.28, "kl_estimator": "k2"},
        {"algo": "ppo", "whiten_rewards": True, "ent_coef": 0.01, "clip_range": 0.05, "clip_range_value": 0.05},
        # no gradient clipping: a loss off by a constant factor would show
        {
            "algo": "rloo",
            "kl_penalty": "loss",
            "kl_estimator": "k3",
            "loss_aggregation": "constant",
            "max_grad_norm": 1e3,
        },
        {"algo": "grpo", "kl_penalty": "loss", "kl_estimator": "k3", "loss_aggregation": "sequence_mean"},
        {"algo": "grpo", "advantage_scaling": "none", "whiten_advantages": False, "kl_estimator": "k3"},
        {"recipe": "dr_grpo"},
        # GSPO's sequence ratio with a wider clip than the paper's 3e-4 (which would stop it after a step)
        {"algo": "grpo", "importance_sampling_level": "sequence", "loss_aggregation": "sequence_mean"},
        {"recipe": "cispo"},
        {"algo": "ppo", "dual_clip_c": 1.1, "clip_range": 0.05},  # a small c, so the bound acts
        {"recipe": "reinforce_pp"},
        {"algo": "grpo", "sampler_correction": "sequence_truncate", "sampler_correction_cap": 1.01},
    ],
    ids=[
        "ppo",
        "ppo-sequence-clip-high-k2",
        "ppo-whiten-rewards-entropy-tight-clip",
        "rloo-kl-loss-constant",
        "grpo-kl-loss-sequence",
        "grpo-unscaled-unwhitened-k3",
        "dr-grpo",
        "gspo",
        "cispo",
        "dual-clip",
        "reinforce-pp",
        "grpo-sampler-correction",
    ],  # fmt: skip
)
def test_fast_update_ends_at_the_references_weights(grouped_rollout, options):
    rollout, agent = grouped_rollout
    config = PPOConfig(**options, **SIZES)
    moved, apart = both_updates(agent, rollout, config, kl_coef=KL_COEF, max_new_tokens=MAX_NEW_TOKENS)
    assert moved > 1e-3 and apart < TOLERANCE * moved


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_fast_update_ends_at_the_references_weights_with_a_perturbed_sampler(grouped_rollout, mode):
    rollout, agent = grouped_rollout
    noise = 0.3 * torch.randn(rollout.logprobs.shape, generator=torch.Generator().manual_seed(1))
    perturbed = rollout._replace(logprobs=torch.where(rollout.mask, rollout.logprobs + noise, 0.0))
    config = PPOConfig(algo="grpo", sampler_correction=mode, sampler_correction_cap=1.5, **SIZES)
    moved, apart = both_updates(agent, perturbed, config, kl_coef=KL_COEF)
    assert moved > 1e-3 and apart < TOLERANCE * moved


def test_fast_update_ends_at_the_references_weights_with_a_filtered_group(grouped_rollout):
    rollout, agent = grouped_rollout
    rewards = rollout.rewards.clone()
    rewards[:4] = 0.0  # the first group's returns all equal: it leaves the mask
    config = PPOConfig(algo="grpo", filter_equal_groups=True, **SIZES)
    moved, apart = both_updates(agent, rollout._replace(rewards=rewards), config, kl_coef=KL_COEF)
    assert moved > 1e-3 and apart < TOLERANCE * moved


def test_fast_update_ends_at_the_references_weights_with_a_separate_critic(grouped_rollout):
    rollout, _ = grouped_rollout
    agent = perturbed_agent(share_backbone=False)
    moved, apart = both_updates(agent, rollout, PPOConfig(**SIZES), kl_coef=KL_COEF)
    assert moved > 1e-3 and apart < TOLERANCE * moved


class TwoTurns:
    """Two agent turns: a reply of 1-3 tokens after the first, turn rewards 0.5 then 1.0."""

    def respond(self, turn: Turn) -> Reply:
        if turn.index == 0:
            return Reply(text=[" and", " but the", " very good and"][len(turn.context_ids) % 3], reward=0.5)
        return Reply(done=True, reward=1.0)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_fast_update_ends_at_the_references_weights_over_several_turns(algo):
    agent = perturbed_agent()
    config = TokenEnvConfig(interaction=TwoTurns(), max_new_tokens=14, max_turns=2, max_env_tokens=4)
    env = make_rollout_env(8, config)
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0), group_size=4)
    assert rollout.env_mask is not None and rollout.env_mask.any()
    ppo = PPOConfig(algo=algo, epochs=2, minibatch_size=4, micro_batch_size=2, group_size=4)
    moved, apart = both_updates(agent, rollout, ppo, kl_coef=config.kl_coef)
    assert moved > 1e-3 and apart < TOLERANCE * moved
