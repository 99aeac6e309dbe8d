"""textenv/core.py: the env's KV-cached log-probs, scores and rewards, and the numbers it refuses to trust.

1. Every finished episode is replayed through plain full-sequence forwards of the reference and reward models
   (no cache, no padding, batch of one), and each per-step reward is rebuilt from the formula in docs/design.md
   (r_t = -beta * kl_t + score term).
2. A reward model that scores NaN or +-inf raises, naming the reward model and the text, in both reward modes.
3. Log-probs from the caller or from a policy callable must be numbers, finite and <= 0 on live slots (an ended
   slot's are ignored); a policy callable that returns None is named with the shape it must return.
"""

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from tests.models import Episode, lockstep_vec
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

ENV_ID = "TokenRLHF-v0"
ATOL = 1e-5
MAX_NEW = 6
KL_COEF = 0.1
SETTINGS = dict(max_new_tokens=MAX_NEW, kl_coef=KL_COEF)  # every env here, on CPU
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


# --------------------------------------------------------------------------- 1. against an uncached recomputation
@pytest.fixture(scope="module")
def models():
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR).eval()
    return tokenizer, reference, reward_model


@torch.no_grad()
def uncached(model, tokens: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([tokens])).logits[0]


def uncached_ref_logprobs(reference, episode: Episode, temperature: float = 1.0) -> np.ndarray:
    logits = uncached(reference, episode.prompt + episode.actions)  # (T, V)
    start = len(episode.prompt) - 1
    steps = torch.arange(len(episode.actions))
    logprobs = torch.log_softmax(logits[start : start + len(episode.actions)].double() / temperature, dim=-1)
    return logprobs[steps, torch.tensor(episode.actions)].numpy()


def uncached_score(reward_model, tokens: list[int]) -> float:
    return float(uncached(reward_model, tokens)[0])


class Script:
    """Actions for each slot: ordinary tokens, then EOS after a drawn length (or never: truncation)."""

    def __init__(self, tokenizer, num_slots: int, seed: int):
        self.rng = np.random.default_rng(seed)
        specials = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
        self.ordinary = np.array([i for i in range(len(tokenizer)) if i not in specials])
        self.eos = tokenizer.eos_token_id
        self.planned = self.rng.integers(1, MAX_NEW + 3, size=num_slots)  # > MAX_NEW: truncated

    def actions(self, episodes: list[Episode]) -> np.ndarray:
        out = self.rng.choice(self.ordinary, size=len(episodes))
        for slot, episode in enumerate(episodes):
            if len(episode.actions) + 1 == self.planned[slot]:
                out[slot] = self.eos
        return out

    def new_episode(self, slot: int) -> None:
        self.planned[slot] = self.rng.integers(1, MAX_NEW + 3)


def prompt_of(observation: dict, slot: int) -> list[int]:
    ids, mask = observation["input_ids"][slot], observation["attention_mask"][slot]
    return ids[mask == 1].tolist()


def run_vector(env, script: Script, steps: int, caller_logprobs: bool = False, reset_every: int = 0):
    """Drive ``env`` and return its finished episodes, recorded from what the env returned."""
    rng = np.random.default_rng(1)
    observation, _ = env.reset(seed=0)
    n = env.num_envs
    episodes = [Episode(prompt_of(observation, s)) for s in range(n)]
    restarting = np.zeros(n, dtype=bool)
    finished = []
    for step in range(steps):
        actions = script.actions(episodes)
        logprobs = -rng.exponential(2.0, size=n) if caller_logprobs else None
        observation, rewards, terminated, truncated, info = env.step(actions, logprobs=logprobs)
        for s in range(n):
            if restarting[s]:  # NEXT_STEP: this step started a new episode and ignored the action
                assert rewards[s] == 0 and not terminated[s] and not truncated[s]
                episodes[s] = Episode(prompt_of(observation, s))
                script.new_episode(s)
                continue
            if episodes[s].terminated or episodes[s].truncated:  # lockstep: ended slot waits, earns nothing
                assert rewards[s] == 0 and not terminated[s] and not truncated[s]
                continue
            e = episodes[s]
            e.actions.append(int(actions[s]))
            e.rewards.append(float(rewards[s]))
            e.ref_logprobs.append(float(info["ref_logprob"][s]))
            e.logprobs.append(float(logprobs[s]) if caller_logprobs else float(info["logprob"][s]))
            e.terminated, e.truncated = bool(terminated[s]), bool(truncated[s])
            assert info["_score"][s] == (e.terminated or e.truncated)
            if e.terminated or e.truncated:
                e.score = float(info["score"][s])
                assert info["response"][s] is not None
                finished.append(e)
        if env.autoreset_mode == AutoresetMode.NEXT_STEP:
            restarting = terminated | truncated
        elif reset_every and step % reset_every == reset_every - 1:
            ended = np.array([e.terminated or e.truncated for e in episodes])
            if ended.any():
                observation, _ = env.reset(options={"reset_mask": ended})
                for s in np.flatnonzero(ended):
                    episodes[s] = Episode(prompt_of(observation, s))
                    script.new_episode(s)
    return finished


def check_episode(episode: Episode, reference, reward_model, source: str, kl_coef=KL_COEF, temperature=1.0):
    assert len(episode.actions) >= 1
    assert episode.terminated == (episode.actions[-1] == 2)
    assert episode.truncated == (not episode.terminated and len(episode.actions) == MAX_NEW)
    ref = uncached_ref_logprobs(reference, episode, temperature)
    np.testing.assert_allclose(episode.ref_logprobs, ref, atol=ATOL, rtol=0)
    score = uncached_score(reward_model, episode.prompt + episode.actions)
    assert episode.score == pytest.approx(score, abs=ATOL)
    if source == "reference_only":
        expected = kl_coef * ref
    else:
        expected = -kl_coef * (np.array(episode.logprobs) - ref)
    expected[-1] += score
    np.testing.assert_allclose(episode.rewards, expected, atol=ATOL, rtol=0)


def test_single_env_matches_uncached_recomputation(models, make_env):
    tokenizer, reference, reward_model = models
    env = make_env(**SETTINGS)
    script = Script(tokenizer, 1, seed=0)
    lengths = set()
    for seed, planned in enumerate([1, 3, MAX_NEW, MAX_NEW + 2, 2]):
        script.planned[0] = planned
        observation, info = env.reset(seed=seed)
        episode = Episode(prompt_of({k: v[None] for k, v in observation.items()}, 0))
        assert episode.prompt == tokenizer(info["prompt"])["input_ids"]
        done = False
        while not done:
            action = int(script.actions([episode])[0])
            observation, reward, terminated, truncated, info = env.step(action)
            assert info["kl_source"] == "reference_only" and info["kl"] is None and info["logprob"] is None
            episode.actions.append(action)
            episode.rewards.append(reward)
            episode.ref_logprobs.append(info["ref_logprob"])
            episode.terminated, episode.truncated, done = terminated, truncated, terminated or truncated
            assert (info["score"] is None) != done
        episode.score = info["score"]
        lengths.add(len(episode.actions))
        check_episode(episode, reference, reward_model, "reference_only")
    assert lengths == {1, 2, 3, MAX_NEW}  # terminated at several lengths, and truncated


@pytest.mark.parametrize("caller_logprobs", [False, True])
def test_vector_env_next_step_autoreset_matches_uncached_recomputation(models, caller_logprobs, make_vec):
    tokenizer, reference, reward_model = models
    env = make_vec(4, **SETTINGS)
    assert env.autoreset_mode == AutoresetMode.NEXT_STEP
    finished = run_vector(env, Script(tokenizer, 4, seed=2), steps=40, caller_logprobs=caller_logprobs)
    assert len(finished) >= 12
    assert {len(e.actions) for e in finished} >= {1, 2, MAX_NEW}  # terminated early, late, and truncated
    assert any(e.truncated for e in finished) and any(e.terminated for e in finished)
    for episode in finished:
        check_episode(episode, reference, reward_model, "caller" if caller_logprobs else "reference_only")
        if caller_logprobs:  # the episode's rewards sum to score - kl_coef * sum(logp - logp_ref)
            kl = np.array(episode.logprobs) - np.array(episode.ref_logprobs)
            assert sum(episode.rewards) == pytest.approx(episode.score - KL_COEF * kl.sum(), abs=1e-4)


def test_vector_env_lockstep_with_partial_resets_matches_uncached_recomputation(models, make_vec):
    tokenizer, reference, reward_model = models
    env = make_vec(5, autoreset_mode=AutoresetMode.DISABLED, **SETTINGS)
    finished = run_vector(env, Script(tokenizer, 5, seed=3), steps=45, reset_every=3)
    assert len(finished) >= 10
    for episode in finished:
        check_episode(episode, reference, reward_model, "reference_only")


def test_cache_stays_bounded_under_autoreset(models, make_vec):
    tokenizer, _, _ = models
    env = make_vec(3, **SETTINGS)
    run_vector(env, Script(tokenizer, 3, seed=4), steps=60)
    # the longest live context is at most max_prompt_tokens + max_new_tokens (a pad column may remain)
    assert env.core.reference.mask.shape[1] <= env.core.context_length + 1


def test_policy_module_gives_kl_against_reference(models, make_vec):
    tokenizer, reference, reward_model = models
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    env = make_vec(3, policy=policy, temperature=0.7, **SETTINGS)
    finished = run_vector(env, Script(tokenizer, 3, seed=5), steps=25)
    assert len(finished) >= 5
    for episode in finished:
        expected = uncached_ref_logprobs(policy, episode, temperature=0.7)  # same recipe, the policy's weights
        np.testing.assert_allclose(episode.logprobs, expected, atol=ATOL, rtol=0)
        check_episode(episode, reference, reward_model, "policy", temperature=0.7)


def test_policy_callable_is_called_on_the_observation(models, make_vec):
    tokenizer, reference, reward_model = models

    @torch.no_grad()
    def policy(observation):  # uniform over the vocabulary, checks it sees the current context
        ids = torch.as_tensor(observation["input_ids"])
        assert ids.shape == (2, 16 + MAX_NEW)
        return torch.full((2, len(tokenizer)), -np.log(len(tokenizer)))

    env = make_vec(2, policy=policy, **SETTINGS)
    finished = run_vector(env, Script(tokenizer, 2, seed=6), steps=15)
    for episode in finished:
        np.testing.assert_allclose(episode.logprobs, -np.log(len(tokenizer)), atol=1e-6)
        check_episode(episode, reference, reward_model, "policy")


def test_dense_score_terms_sum_to_final_minus_prompt_score(models, make_vec):
    tokenizer, reference, reward_model = models
    env = make_vec(3, reward_mode="dense", **SETTINGS)
    finished = run_vector(env, Script(tokenizer, 3, seed=7), steps=30, caller_logprobs=True)
    assert len(finished) >= 6
    for episode in finished:
        ref = uncached_ref_logprobs(reference, episode)
        kl_part = -KL_COEF * (np.array(episode.logprobs) - ref)
        prefix_scores = [
            uncached_score(reward_model, episode.prompt + episode.actions[:k]) for k in range(len(episode.actions) + 1)
        ]
        score_terms = np.array(episode.rewards) - kl_part
        np.testing.assert_allclose(score_terms, np.diff(prefix_scores), atol=ATOL, rtol=0)
        assert score_terms.sum() == pytest.approx(episode.score - prefix_scores[0], abs=ATOL)


def test_score_clip_and_missing_eos_penalty(models, make_vec):
    tokenizer, reference, reward_model = models
    env = make_vec(3, score_clip=0.5, missing_eos_penalty=1.0, **SETTINGS)
    finished = run_vector(env, Script(tokenizer, 3, seed=8), steps=30)
    assert any(e.truncated for e in finished) and any(e.terminated for e in finished)
    for episode in finished:
        ref = uncached_ref_logprobs(reference, episode)
        score = uncached_score(reward_model, episode.prompt + episode.actions)
        assert episode.score == pytest.approx(score, abs=ATOL)  # info carries the raw score
        last = min(max(score, -0.5), 0.5) - (1.0 if episode.truncated else 0.0)
        assert episode.rewards[-1] == pytest.approx(KL_COEF * ref[-1] + last, abs=ATOL)


# --------------------------------------------------------------------------- 2. non-finite scores
class ConstantHead(torch.nn.Module):
    """A score head that gives ``value`` at every position: a reward model gone wrong."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, hidden_states):
        return torch.full((*hidden_states.shape[:-1], 1), self.value, dtype=hidden_states.dtype)


def broken_reward_model(value: float):
    model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR)
    model.score = ConstantHead(value)
    return model


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_broken_reward_model_is_broken(value):
    """The premise of the tests below: every score of the broken model is ``value``."""
    model = broken_reward_model(value)
    ids = torch.tensor([[5, 6, 2]])
    score = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert score.shape == (1, 1)
    np.testing.assert_equal(score.item(), value)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("reward_mode", ["sparse", "dense"])
def test_non_finite_score_raises_naming_the_reward_model_and_the_text(reward_mode, value, tokenizer, make_env):
    prompt = "great movie"
    env = make_env(reward_model=broken_reward_model(value), reward_mode=reward_mode, prompts=[prompt])
    env.reset(options={"prompt_index": 0})  # constructing and resetting are fine: only a reward is wrong
    eos = tokenizer.eos_token_id
    text = tokenizer.decode(tokenizer(prompt)["input_ids"] + [eos])
    with pytest.raises(ValueError, match=rf"the reward model scored slot 0's text {re.escape(repr(text))} as "):
        env.step(eos)  # sparse: the score of the finished episode; dense: the first change of score


# --------------------------------------------------------------------------- 3. log-probs
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf"), 0.5], ids=["nan", "-inf", "inf", "0.5"])
def test_caller_logprobs_must_be_finite_and_not_positive(bad, vec_env):
    vec_env.reset(seed=0)
    before = vec_env.core.observation()
    with pytest.raises(ValueError, match=r"logprobs passed to step\(\) must be finite log-probabilities.*slot 1"):
        vec_env.step(np.array([5, 6]), logprobs=np.array([-1.0, bad]))
    after = vec_env.core.observation()
    assert all(np.array_equal(before[key], after[key]) for key in before)  # the refused step changed nothing


@pytest.mark.parametrize("value", [-1e-7, 0.0, -0.0])
def test_caller_logprobs_at_or_just_below_zero_are_accepted(value, vec_env):
    vec_env.reset(seed=0)
    _, rewards, _, _, info = vec_env.step(np.array([5, 6]), logprobs=np.array([value, -2.0]))
    assert info["kl_source"].tolist() == ["caller", "caller"]
    np.testing.assert_allclose(info["logprob"], [value, -2.0], atol=1e-12)
    assert np.isfinite(rewards).all()


def test_garbage_logprob_of_an_ended_slot_is_ignored(make_vec):
    vec = make_vec(3, autoreset_mode="Disabled", max_new_tokens=4)
    vec.reset(seed=0)
    eos = vec.core.eos_token_id
    _, _, terminated, _, _ = vec.step(np.array([eos, 5, 5]), logprobs=np.array([-1.0, -1.0, -1.0]))
    assert terminated.tolist() == [True, False, False]
    _, rewards, terminated, truncated, info = vec.step(
        np.array([5, 5, 5]), logprobs=np.array([float("nan"), -1.0, -1.0])
    )
    assert rewards[0] == 0.0 and not terminated[0] and not truncated[0]
    assert np.isfinite(rewards).all()
    assert info["kl_source"].tolist() == ["", "caller", "caller"]
    # the same NaN in a live slot is refused
    with pytest.raises(ValueError, match=r"logprobs.*slot 1"):
        vec.step(np.array([5, 5, 5]), logprobs=np.array([-1.0, float("nan"), -1.0]))


@pytest.mark.parametrize("bad", [0.5, float("nan")], ids=["0.5", "nan"])
def test_policy_callable_logprobs_must_be_finite_and_not_positive(bad, make_env):
    action = 5

    def policy(obs, chosen=None):
        table = np.full((1, 446), np.log(1 / 446))
        if chosen is not None:
            table[0, action] = chosen
        return table

    good = make_env(policy=policy, max_new_tokens=4)
    good.reset(seed=0)
    _, _, _, _, info = good.step(action)
    assert info["kl_source"] == "policy"
    np.testing.assert_allclose(info["logprob"], np.log(1 / 446), rtol=1e-6)

    env = make_env(policy=lambda obs: policy(obs, bad), max_new_tokens=4)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"the policy callable's log-probs of the chosen tokens must be finite"):
        env.step(action)


@pytest.mark.parametrize("logprobs", [["-1.0", "-2.0"], [None, None], "abc"])
def test_logprobs_that_are_not_numbers_raise_a_type_error_naming_logprobs(logprobs):
    env = lockstep_vec()
    env.reset(seed=0)
    with pytest.raises(TypeError, match=r"logprobs passed to step\(\) must be numbers: .*shape \(2,\); got"):
        env.step(np.array([5, 5]), logprobs=logprobs)


def test_a_policy_callable_that_returns_none_is_named_with_the_shape_it_must_return():
    def forgetful(observations):
        return None

    env = gym.make(ENV_ID, policy=forgetful, device="cpu")
    env.reset(seed=0)
    with pytest.raises(
        TypeError,
        match=r"the policy callable 'forgetful' must return log-probabilities of shape \(1, 446\) \(slots, "
        r"vocabulary\), a tensor or array of numbers; got NoneType None",
    ):
        env.step(5)
