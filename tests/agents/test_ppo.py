"""The PPO agent on the real default task: rollout, re-scoring, one update, learning, save and load."""

import copy
import statistics
from types import SimpleNamespace

import pytest
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    OPTConfig,
    OPTForCausalLM,
)

import textenv  # noqa: F401
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update, score_rollout
from agents.rollout import collect_rollout
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

LOCKSTEP = AutoresetMode.DISABLED  # every env here: rollouts reset all rows together


def rollout_of(agent, env, seed=0):
    return collect_rollout(agent, env, temperature=1.0, seed=seed, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def env(make_vec):
    return make_vec(8, autoreset_mode=LOCKSTEP, max_new_tokens=12)


@pytest.mark.parametrize("share_backbone", [True, False])
def test_rollout_logprobs_equal_rescored_logprobs(env, share_backbone):
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=REWARD_MODEL_DIR).eval()
    rollout = rollout_of(agent, env)
    assert rollout.mask.any(1).all() and (rollout.mask.sum(1) > 1).any()
    assert rollout.terminated.any()  # episodes of different lengths, some ended by EOS
    with torch.no_grad():
        scored = score_rollout(agent, rollout, temperature=1.0)
    mask = rollout.mask
    torch.testing.assert_close(scored.logprobs[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)
    # the env got the same log-probs: its per-step KL is logprob - ref_logprob with ref = the same SFT model
    torch.testing.assert_close(rollout.kl[mask], torch.zeros_like(rollout.kl[mask]), atol=1e-5, rtol=0)
    # the score term sits on the last step of each episode
    last = mask.sum(1) - 1
    final_rewards = rollout.rewards[torch.arange(len(last)), last]
    torch.testing.assert_close(final_rewards, rollout.scores.clamp(-5, 5) + 0.0, atol=1e-4, rtol=0)


def test_rollout_stops_at_eos_and_masks_what_follows(env):
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    rollout = rollout_of(agent, env, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    for row in range(len(rollout.actions)):
        taken = rollout.actions[row][rollout.mask[row]].tolist()
        assert (taken[-1] == tokenizer.eos_token_id) == bool(rollout.terminated[row])
        assert tokenizer.eos_token_id not in taken[:-1]
        assert rollout.rewards[row][~rollout.mask[row]].eq(0).all()
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        whole, head = (tokenizer.decode(ids, skip_special_tokens=True) for ids in (prompt + taken, prompt))
        assert rollout.responses[row] == whole[len(head) :]  # decoded after the prompt, as reward functions read it


@pytest.mark.parametrize("share_backbone", [True, False])
def test_one_update_moves_every_trainable_parameter_and_no_frozen_one(share_backbone, make_vec):
    reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR)
    frozen_before = {
        name: copy.deepcopy(model.state_dict()) for name, model in (("ref", reference), ("rm", reward_model))
    }
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    env = make_vec(
        8,
        autoreset_mode=LOCKSTEP,
        max_new_tokens=12,
        reference_model=reference,
        reward_model=reward_model,
        tokenizer=tokenizer,
    )
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=reward_model)
    before = {name: p.detach().clone() for name, p in agent.named_parameters()}
    rollout = rollout_of(agent.eval(), env)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    # two optimizer steps: the value head starts at zero, so a separate critic trunk gets its first gradient
    # only once the head has moved
    config = PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=2)
    metrics = ppo_update(
        agent.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=env.kl_coef
    )

    assert metrics["ppo/first_ratio_mean"] == 1.0  # old log-probs re-scored in the same micro-batches
    unchanged = [name for name, p in agent.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert (agent.critic is None) == share_backbone
    for name, model in (("ref", reference), ("rm", reward_model)):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in frozen_before[name].items()), f"{name} changed"
        assert not any(p.requires_grad for p in model.parameters())
    for key in ("loss/policy", "loss/value", "ppo/approx_kl", "ppo/clipfrac", "ppo/value_clipfrac",
                "ppo/explained_variance", "ppo/ratio_mean", "policy/entropy"):  # fmt: skip
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN


def test_gradient_accumulation_equals_one_big_minibatch(env):
    agent = ActorCritic.from_models(POLICY_DIR)
    rollout = rollout_of(agent.eval(), env)
    results = []
    for micro in (8, 2):
        clone = copy.deepcopy(agent).train()
        optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
        config = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=micro, max_grad_norm=1e9)
        ppo_update(clone, optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=env.kl_coef)
        results.append(dict(clone.named_parameters()))
    for name, parameter in results[0].items():
        torch.testing.assert_close(parameter, results[1][name], atol=2e-6, rtol=1e-4)


class TargetTokenReward(nn.Module):
    """A reward model for a tiny task: the score is 1 when ``target`` appears in the response, else 0."""

    def __init__(self, vocab_size: int, target: int, prompt_length: int):
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=0, model_type="target-token")
        self.embedding = nn.Embedding(vocab_size, 1)  # only so the env can check the vocabulary
        self.target, self.prompt_length = target, prompt_length

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, input_ids, attention_mask, **_):
        hits = ((input_ids == self.target) & attention_mask.bool()).sum(-1, keepdim=True).float()
        return SimpleNamespace(logits=hits.clamp(max=1))


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_learns_to_emit_a_target_token(algo, make_vec):
    """The SFT policy writes "quite" in about 1 response of 6; after 16 updates it writes it nearly always.

    Independent of torch's thread count (summation order): the first rollout is the SFT
    policy's, and the median over the last 8 rollouts tolerates a dip of a few.
    """
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    target = tokenizer.convert_tokens_to_ids("▁quite")
    prompt = "The film was"
    env = make_vec(
        16,
        autoreset_mode=LOCKSTEP,
        max_new_tokens=6,
        prompts=[prompt],
        reward_model=TargetTokenReward(len(tokenizer), target, len(tokenizer(prompt)["input_ids"])),
        kl_coef=0.01,
    )
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    config = PPOConfig(algo=algo, group_size=4, epochs=4, minibatch_size=8, micro_batch_size=8)
    group = None if algo == "ppo" else 4
    shuffling, sampling = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    scores = []
    for iteration in range(16):
        rollout = collect_rollout(agent.eval(), env, 1.0, iteration, sampling, group_size=group)
        scores.append(float(rollout.scores.mean()))
        ppo_update(agent.train(), optimizer, rollout, config, 1.0, shuffling, kl_coef=env.kl_coef)
    assert scores[0] <= 0.25, scores
    assert statistics.median(scores[-8:]) >= 0.85, scores


def test_group_rollout_shares_prompts_within_groups(make_vec):
    env = make_vec(8, autoreset_mode=LOCKSTEP, max_new_tokens=4)
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    rollout = collect_rollout(agent, env, 1.0, 0, torch.Generator().manual_seed(0), group_size=4)
    groups = [rollout.prompts[i : i + 4] for i in range(0, 8, 4)]
    assert all(len(set(group)) == 1 for group in groups)
    prompt_ids = rollout.prompt_ids.reshape(2, 4, -1)
    assert (prompt_ids == prompt_ids[:, :1]).all()
    assert len({rollout.responses[i] for i in range(4)}) > 1  # same prompt, sampled separately


def test_save_and_load_round_trip(tmp_path, env):
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=REWARD_MODEL_DIR)
    with torch.no_grad():
        agent.value_head.weight.normal_()
    agent.save_pretrained(tmp_path / "agent")
    loaded = ActorCritic.from_pretrained(tmp_path / "agent")
    rollout = rollout_of(agent.eval(), env)
    with torch.no_grad():
        a, b = score_rollout(agent, rollout, 1.0), score_rollout(loaded.eval(), rollout, 1.0)
    torch.testing.assert_close(a.logprobs, b.logprobs)
    torch.testing.assert_close(a.values, b.values)
    # the policy alone is an ordinary Hugging Face model
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "agent")
    ids = rollout.input_ids[:1]
    torch.testing.assert_close(plain(ids).logits, agent.policy(ids).logits)


def test_dropout_kept_in_the_config_is_off_in_the_trained_agent():
    """OPT keeps its dropout rates as numbers (config and layer attributes); train-mode forwards must agree."""
    config = OPTConfig(
        vocab_size=64, hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, dropout=0.5, attention_dropout=0.5, layerdrop=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones_like(ids)
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        dropped = OPTForCausalLM(config).train()
        assert not torch.equal(dropped(ids).logits, dropped(ids).logits)  # the rates do act in train mode
        agent = ActorCritic.from_models(OPTForCausalLM(config)).train()
        first, second = agent(ids, mask, positions), agent(ids, mask, positions)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.values, second.values)
    assert agent.policy.config.dropout == agent.policy.config.attention_dropout == agent.policy.config.layerdrop == 0.0
