"""What TokenRLHF-v0 refuses to trust, and where it says so.

1. Non-finite numbers (kl_coef, score_clip, missing_eos_penalty, temperature) are refused where they enter:
   gym.make, gym.make_vec, TokenEnvConfig and the kl_coef setter of both envs.
2. ``env.kl_coef = x`` on the env from gym.make reaches the env and its rewards.
3. Arguments of the wrong type (num_envs, max_new_tokens, kl_coef, temperature, reset options, unknown
   keywords, config= with keywords) raise TypeError naming the argument.
4. Prompt text is text: the literal text of the EOS and PAD tokens in a prompt does not become those tokens.
5. A reward model that scores NaN or +-inf raises, naming the reward model and the text, in both reward modes.
6. Log-probs from the caller or from a policy callable must be finite and <= 0 on live slots.
7. A reward_model directory that is a causal LM or a 2-label classifier is refused by what it is.
8. A reward_model directory that carries a tokenizer other than the policy's is refused.
9. Dropout rates kept as numbers (configs, attention attributes) are zeroed in the frozen models.

Everything runs offline on the embedded default task or on tiny in-memory models, on CPU.
"""

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2ForSequenceClassification,
)

from tests.models import tiny_causal_lm, tiny_gpt2_config
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

ENV_ID = "TokenRLHF-v0"
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
FLOAT_FIELDS = ["kl_coef", "score_clip", "missing_eos_penalty", "temperature"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


@pytest.fixture(scope="module")
def single_env(make_env):
    """A single env shared by the tests that leave it as they found it (they reset it first)."""
    env = make_env(max_new_tokens=4)
    yield env
    env.close()


@pytest.fixture(scope="module")
def vec_env(make_vec):
    env = make_vec(2, max_new_tokens=4)
    yield env
    env.close()


# --------------------------------------------------------------------------- 1. non-finite numbers
def build_with(entry: str, field: str, value):
    """Build an env (or a config) through ``entry`` with one field set; the check fails before any model loads."""
    if entry == "make":
        return gym.make(ENV_ID, device="cpu", **{field: value})
    if entry == "make_vec":
        return gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", device="cpu", **{field: value})
    return TokenEnvConfig(**{field: value})


@pytest.mark.parametrize("entry", ["make", "make_vec", "config"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_number_is_refused_naming_the_field(entry, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*finite, got {re.escape(str(value))}$"):
        build_with(entry, field, value)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["single", "vector"])
def test_kl_coef_setter_refuses_non_finite_and_keeps_the_value(which, value, single_env, vec_env):
    env = single_env if which == "single" else vec_env
    before = env.kl_coef
    assert np.isfinite(before)
    with pytest.raises(ValueError, match=rf"kl_coef must be .*finite, got {re.escape(str(value))}"):
        env.kl_coef = value
    assert env.kl_coef == before
    assert env.unwrapped.core.kl_coef == before


# --------------------------------------------------------------------------- 2. kl_coef reaches the env
def test_kl_coef_set_on_gym_make_env_reaches_the_env_and_its_rewards(make_env):
    env = make_env(kl_coef=0.1, max_new_tokens=4)  # no policy: reward = kl_coef * ref_logprob before the end
    env.reset(seed=0, options={"prompt_index": 0})
    _, first, terminated, truncated, info = env.step(5)
    assert not (terminated or truncated) and info["kl_source"] == "reference_only"
    np.testing.assert_allclose(first, 0.1 * info["ref_logprob"], rtol=1e-6)
    assert first < 0

    env.kl_coef = 0.2
    assert env.unwrapped.kl_coef == 0.2
    assert env.unwrapped.core.kl_coef == 0.2
    env.reset(seed=0, options={"prompt_index": 0})
    _, second, *_ = env.step(5)
    np.testing.assert_allclose(second, 2 * first, rtol=1e-6)


# --------------------------------------------------------------------------- 3. wrong types
@pytest.mark.parametrize("num_envs", [2.5, True], ids=["float", "bool"])
def test_vector_num_envs_of_wrong_type(num_envs):
    with pytest.raises(TypeError, match=rf"num_envs must be an int, got {num_envs!r}"):
        gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", device="cpu")


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("max_new_tokens", "8", "an int"),
        ("max_new_tokens", 8.0, "an int"),
        ("kl_coef", "0.1", "a number"),
        ("temperature", None, "a number"),
    ],
)
@pytest.mark.parametrize("entry", ["make", "make_vec", "config"])
def test_setting_of_wrong_type_is_refused_naming_it(entry, field, value, kind):
    with pytest.raises(TypeError, match=rf"^{field} must be {kind}, got {re.escape(repr(value))}"):
        build_with(entry, field, value)


@pytest.mark.parametrize("options", [[("prompt_index", 0)], "x"], ids=["list-of-pairs", "str"])
@pytest.mark.parametrize("which", ["single", "vector"])
def test_reset_options_must_be_a_dict(which, options, single_env, vec_env):
    env = single_env if which == "single" else vec_env
    with pytest.raises(TypeError, match=r"options must be a dict \(or None\)"):
        env.reset(options=options)


@pytest.mark.parametrize("entry", ["make", "make_vec"])
def test_unknown_keyword_is_refused_naming_it(entry):
    with pytest.raises(TypeError, match=r"unknown env arguments \['foo'\]"):
        build_with(entry, "foo", 1)


@pytest.mark.parametrize("entry", ["make", "make_vec"])
def test_config_and_keywords_together_are_refused(entry):
    kwargs = {"config": TokenEnvConfig(), "max_new_tokens": 4}
    with pytest.raises(TypeError, match=r"pass either config= or keyword arguments, not both.*max_new_tokens"):
        if entry == "make":
            gym.make(ENV_ID, **kwargs)
        else:
            gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", **kwargs)


# --------------------------------------------------------------------------- 4. prompt text is text
@pytest.mark.parametrize("tokenizer_source", ["loaded", "directory"])
def test_special_token_text_in_a_prompt_stays_text(tokenizer_source, tokenizer, tmp_path, make_env):
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt = f"great movie {tokenizer.eos_token} {tokenizer.pad_token}"
    # the hazard: tokenized as plain input, the marker text becomes the special tokens themselves
    assert {eos_id, pad_id} <= set(tokenizer(prompt)["input_ids"])
    expected = tokenizer(prompt, split_special_tokens=True)["input_ids"]
    assert eos_id not in expected and pad_id not in expected

    source = tokenizer
    if tokenizer_source == "directory":
        tokenizer.save_pretrained(tmp_path / "tok")
        source = str(tmp_path / "tok")
    env = make_env(prompts=[prompt, "a plain one"], tokenizer=source, max_new_tokens=4)
    obs, info = env.reset(options={"prompt_index": 0})
    assert info["prompt"] == prompt
    real = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert eos_id not in real and pad_id not in real
    assert real == expected
    # the episode is not over: the EOS text in the prompt ended nothing
    _, _, terminated, truncated, _ = env.step(5)
    assert not terminated and not truncated


# --------------------------------------------------------------------------- 5. a reward model that scores NaN or inf
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


# --------------------------------------------------------------------------- 6. log-probs from the caller
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


# --------------------------------------------------------------------------- 7. the wrong kind of reward model
def test_causal_lm_directory_as_reward_model_is_refused(make_env):
    with pytest.raises(ValueError, match=r"reward model .* is a GPT2LMHeadModel, not a sequence classifier"):
        make_env(reward_model=str(POLICY_DIR))


def test_two_label_classifier_directory_as_reward_model_is_refused(tmp_path, make_env):
    torch.manual_seed(0)
    GPT2ForSequenceClassification(tiny_gpt2_config(446, num_labels=2)).save_pretrained(tmp_path / "rm2")
    with pytest.raises(ValueError, match=r"reward model .*rm2.* has a classifier head with 2 labels.*num_labels=1"):
        make_env(reward_model=str(tmp_path / "rm2"))


# --------------------------------------------------------------------------- 8. a reward model with its own tokenizer
def save_reward_model_with(tokenizer, directory):
    AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reward_model_directory_with_the_policy_tokenizer_is_accepted(tokenizer, tmp_path, make_env):
    directory = save_reward_model_with(tokenizer, tmp_path / "rm")
    env = make_env(reward_model=directory, max_new_tokens=2)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(tokenizer.eos_token_id)
    assert terminated and np.isfinite(reward) and info["score"] is not None


# --------------------------------------------------------------------------- 9. dropout rates kept as numbers
def tiny_llama(dropout):
    return tiny_causal_lm("llama", attention_dropout=dropout).train()


def tiny_opt(dropout):
    return tiny_causal_lm("opt", dropout=dropout, attention_dropout=dropout).train()


def train_mode_logits(model):
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        return [model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for _ in range(2)]


@pytest.mark.parametrize(
    ("build", "fields"), [(tiny_llama, ["attention_dropout"]), (tiny_opt, ["dropout", "attention_dropout"])]
)
def test_frozen_reference_model_has_no_dropout_even_in_train_mode(build, fields, tokenizer, make_env):
    torch.manual_seed(0)
    control = build(0.5)  # the premise: with these rates, two train-mode forwards differ
    first, second = train_mode_logits(control)
    assert not torch.equal(first, second)

    torch.manual_seed(0)
    env = make_env(reference_model=build(0.5), tokenizer=tokenizer, max_new_tokens=4)
    reference = env.unwrapped.reference_model
    for field in fields:
        assert getattr(reference.config, field) == 0.0, field
    first, second = train_mode_logits(reference)
    assert torch.equal(first, second)


# --------------------------------------------------------------------------- 10. a cache the core cannot step
def test_a_model_without_a_dynamic_cache_is_refused_naming_the_cache_class(tokenizer, make_env):
    from transformers import AutoModelForCausalLM

    class TupleCacheLM(type(AutoModelForCausalLM.from_pretrained(POLICY_DIR))):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            key = "cache" if "cache" in out else "past_key_values"  # its name since transformers 5.24, and before
            out[key] = tuple(out[key].layers)  # a legacy tuple, not a DynamicCache
            return out

    model = TupleCacheLM.from_pretrained(POLICY_DIR)
    with pytest.raises(TypeError, match=r"reference model \(TupleCacheLM\) returns a tuple KV cache.*DynamicCache"):
        make_env(reference_model=model, tokenizer=tokenizer)
