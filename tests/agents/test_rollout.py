"""agents/rollout.py: what a rollout holds, against a re-scoring forward and the env's own numbers.

1. On the default task: the sampled log-probs equal a re-scoring forward's, episodes stop at EOS and mask what
   follows, a group rollout shares each prompt within its group.
2. On episodes of several turns (``multi_turn_rollout_and_agent``, tests/agents/conftest.py): the environment's
   tokens are columns without steps (no log-prob, reward or KL), the agent's log-probs (sampled with its KV cache
   fed the environment's tokens) equal a teacher-forced forward over the whole context, and turn rewards sit on the
   last agent token of each turn.
"""

import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoTokenizer

import textenv  # noqa: F401
from agents.policy import ActorCritic
from agents.ppo import score_rollout
from agents.rollout import collect_rollout
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

LOCKSTEP = AutoresetMode.DISABLED  # every env here: rollouts reset all rows together
KL_COEF = 0.05  # the multi-turn rollout's kl_coef: multi_turn_rollout_and_agent in tests/agents/conftest.py


def rollout_of(agent, env, seed=0):
    return collect_rollout(agent, env, temperature=1.0, seed=seed, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- on the default task
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


def test_group_rollout_shares_prompts_within_groups(make_vec):
    env = make_vec(8, autoreset_mode=LOCKSTEP, max_new_tokens=4)
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    rollout = collect_rollout(agent, env, 1.0, 0, torch.Generator().manual_seed(0), group_size=4)
    groups = [rollout.prompts[i : i + 4] for i in range(0, 8, 4)]
    assert all(len(set(group)) == 1 for group in groups)
    prompt_ids = rollout.prompt_ids.reshape(2, 4, -1)
    assert (prompt_ids == prompt_ids[:, :1]).all()
    assert len({rollout.responses[i] for i in range(4)}) > 1  # same prompt, sampled separately


# --------------------------------------------------------------------------- several turns
def test_environment_tokens_are_columns_without_steps(multi_turn_rollout_and_agent):
    rollout, _ = multi_turn_rollout_and_agent
    assert rollout.env_mask is not None and rollout.env_mask.any()
    assert not (rollout.mask & rollout.env_mask).any()
    for name in ("logprobs", "rewards", "kl", "ref_logprobs"):
        assert (getattr(rollout, name)[rollout.env_mask] == 0).all(), name
    # the attention mask covers prompt, agent and environment tokens, and nothing after the episode
    context = rollout.mask | rollout.env_mask
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_ids.shape[1] :].bool(), context)


def test_sampled_logprobs_equal_a_forward_over_the_whole_context(multi_turn_rollout_and_agent):
    rollout, agent = multi_turn_rollout_and_agent
    with torch.no_grad():
        scored = score_rollout(agent, rollout, 1.0)
    torch.testing.assert_close(scored.logprobs[rollout.mask], rollout.logprobs[rollout.mask], atol=1e-5, rtol=0)
    # the env's KL is the sampling log-prob minus the reference's: the same numbers on the agent's tokens
    torch.testing.assert_close(rollout.kl[rollout.mask], (rollout.logprobs - rollout.ref_logprobs)[rollout.mask])


def test_turn_rewards_sit_on_the_last_agent_token_of_each_turn(multi_turn_rollout_and_agent):
    rollout, _ = multi_turn_rollout_and_agent
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


def test_the_interaction_term_is_what_the_replies_paid_each_episode(multi_turn_rollout_and_agent):
    from agents.evaluate import concatenate, summarize
    from agents.rollout import INTERACTION_TERM

    rollout, _ = multi_turn_rollout_and_agent
    eos = 2
    expected = torch.zeros(len(rollout.actions))
    for row in range(len(rollout.actions)):  # Talk pays 0.5 for the first turn and 1.0 for the second
        turns_ended = int((rollout.actions[row][rollout.mask[row]] == eos).sum())
        expected[row] = [0.0, 0.5, 1.5][turns_ended]
    assert len(set(expected.tolist())) > 1  # some episodes were cut off before a turn ended: the test can fail
    torch.testing.assert_close(rollout.reward_terms[INTERACTION_TERM], expected)
    data = concatenate([rollout])
    metrics = summarize(data, "eval")
    assert metrics["eval/reward/interaction"] == pytest.approx(float(expected.mean()))
    assert metrics["eval/interaction_gt0_rate"] == pytest.approx(float((expected > 0).float().mean()))
