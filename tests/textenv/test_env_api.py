"""The public API of TokenRLHF-v0: spaces, checkers, seeding, observation layout, episode ends, render,
reset options, argument validation, prompt sources and frozen models.

Everything runs offline on the embedded default task (or on tiny in-memory models).
"""

import functools
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

import textenv
from tests.models import tiny_gpt2_config
from textenv import TokenGenerationEnv, TokenGenerationVectorEnv
from textenv.default_task import POLICY_DIR, load_prompts

ENV_ID = "TokenRLHF-v0"
LONG_PROMPT = (
    "I thought the acting was great and the plot was moving and the soundtrack was excellent and the cast was superb"
)


# --------------------------------------------------------------------------- helpers and fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


@pytest.fixture(scope="module")
def vocab_size(tokenizer):
    return len(tokenizer)


@pytest.fixture(scope="module")
def env():
    """The default env, as a user gets it. Every test that uses it resets it first."""
    env = gym.make(ENV_ID)
    yield env
    env.close()


@pytest.fixture(scope="module")
def short_env():
    """Three new tokens per episode: quick episode ends."""
    env = gym.make(ENV_ID, max_new_tokens=3)
    yield env
    env.close()


@pytest.fixture(scope="module")
def make_vec(make_vec):
    """The shared vector-env factory (tests/conftest.py) on the env's default device, as a user gets it."""
    return functools.partial(make_vec, device=None)


class FakeDataset:
    """The part of ``datasets.Dataset`` the env uses: ``column_names`` and ``dataset[column] -> list``."""

    def __init__(self, columns: dict[str, list]):
        self._columns = columns

    @property
    def column_names(self):
        return list(self._columns)

    def __getitem__(self, column):
        return list(self._columns[column])


def assert_same_value(a, b, where=""):
    """Equality that treats NaN as equal to NaN, for scalars, strings, None and (object) arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=where)  # NaN == NaN here
        else:
            assert a.tolist() == b.tolist(), where
    elif isinstance(a, float) and isinstance(b, float):
        assert (np.isnan(a) and np.isnan(b)) or a == b, where
    else:
        assert type(a) is type(b) and a == b, where


def assert_same_info(a: dict, b: dict, where=""):
    assert a.keys() == b.keys(), where
    for key in a:
        assert_same_value(a[key], b[key], f"{where} info[{key!r}]")


def assert_same_obs(a: dict, b: dict, where=""):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, where
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{where} obs[{key!r}]")


def non_eos_action(env, step: int) -> int:
    """A token id that is not EOS (varied by ``step``)."""
    core = env.unwrapped.core
    action = 5 + step % 40
    assert action != core.eos_token_id
    return action


# --------------------------------------------------------------------------- 1. checkers
def test_registered_entry_points():
    spec = gym.spec(ENV_ID)
    assert spec.entry_point == "textenv.env:TokenGenerationEnv"
    assert spec.vector_entry_point == "textenv.vector_env:TokenGenerationVectorEnv"
    assert isinstance(gym.make(ENV_ID).unwrapped, TokenGenerationEnv)


def test_gymnasium_env_checker_passes_without_warnings(env):
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)  # also builds a render_mode="human" env from the spec, which prints the prompt
    assert [str(w.message) for w in caught] == []


def test_sb3_env_checker_passes_without_warnings(env):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, warn=True)
    assert [str(w.message) for w in caught] == []


# --------------------------------------------------------------------------- 2. spaces
def test_single_spaces(env, vocab_size):
    assert env.action_space == spaces.Discrete(vocab_size)
    assert isinstance(env.observation_space, spaces.Dict)
    assert set(env.observation_space.spaces) == {"input_ids", "attention_mask"}
    ids_space, mask_space = env.observation_space["input_ids"], env.observation_space["attention_mask"]
    assert ids_space.dtype == mask_space.dtype == np.int64
    assert ids_space.shape == mask_space.shape == (16 + 32,)
    assert (ids_space.low == 0).all() and (ids_space.high == vocab_size - 1).all()
    assert (mask_space.low == 0).all() and (mask_space.high == 1).all()


def test_vector_env_spaces_are_batched_single_spaces(env, vocab_size, make_vec):
    vec = make_vec(3)
    try:
        assert isinstance(vec, TokenGenerationVectorEnv)
        assert vec.num_envs == 3
        assert vec.autoreset_mode == AutoresetMode.NEXT_STEP
        assert vec.single_observation_space == env.observation_space
        assert vec.single_action_space == env.action_space
        assert vec.observation_space == batch_space(vec.single_observation_space, 3)
        assert vec.action_space == batch_space(vec.single_action_space, 3)
        assert vec.action_space == spaces.MultiDiscrete([vocab_size] * 3)
        assert vec.observation_space["input_ids"].shape == (3, 48)

        obs, info = vec.reset(seed=0)
        assert obs in vec.observation_space
        assert info["prompt"].shape == info["prompt_index"].shape == (3,)
        rng = np.random.default_rng(0)
        for _ in range(5):
            for key, value in obs.items():
                assert value.dtype == np.int64, key
                assert value.shape == (3, 48), key
            assert obs in vec.observation_space
            obs, rewards, terminated, truncated, _ = vec.step(rng.integers(3, vocab_size, size=3))
            assert rewards.shape == terminated.shape == truncated.shape == (3,)
            assert terminated.dtype == truncated.dtype == bool
        assert obs in vec.observation_space
    finally:
        vec.close()


def test_single_observations_lie_in_space(env, vocab_size):
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(3)
    for _ in range(5):
        assert obs in env.observation_space
        assert obs["input_ids"].dtype == obs["attention_mask"].dtype == np.int64
        obs, reward, terminated, truncated, _ = env.step(int(rng.integers(3, vocab_size)))
        assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
    assert obs in env.observation_space


# --------------------------------------------------------------------------- 3. seeding and determinism
def rollout_single(env, seed, actions):
    obs, info = env.reset(seed=seed)
    trace = [(obs, info)]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        trace.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            obs, info = env.reset()
            trace.append((obs, info))
    return trace


def test_single_env_same_seed_same_trajectory():
    env_a, env_b = gym.make(ENV_ID, max_new_tokens=4), gym.make(ENV_ID, max_new_tokens=4)
    eos = env_a.unwrapped.core.eos_token_id
    actions = [7, 8, eos, 9, 10, 11, 12, 13, 14, eos, 5]  # an EOS end, a truncation, another EOS end
    trace_a = rollout_single(env_a, 42, actions)
    trace_b = rollout_single(env_b, 42, actions)
    assert len(trace_a) == len(trace_b) == len(actions) + 4
    ended = 0
    for t, (a, b) in enumerate(zip(trace_a, trace_b)):
        assert_same_obs(a[0], b[0], f"t={t}")
        assert_same_info(a[-1], b[-1], f"t={t}")
        if len(a) == 5:
            assert a[1:4] == b[1:4], f"t={t}"
            ended += a[2] or a[3]
    assert ended == 3
    # The rerun of the same env instance with the same seed repeats it too.
    assert_same_info(rollout_single(env_a, 42, actions)[-2][-1], trace_a[-2][-1])


def test_single_env_different_seeds_give_different_prompts(env):
    def prompts(seed):
        first = env.reset(seed=seed)[1]["prompt_index"]
        return [first] + [env.reset()[1]["prompt_index"] for _ in range(5)]

    assert prompts(0) == prompts(0)
    assert prompts(0) != prompts(1)
    assert prompts(1) != prompts(2)
    assert len(set(prompts(0))) > 1  # unseeded resets continue the seeded stream, not the same prompt


def rollout_vector(vec, seed, actions_list):
    obs, info = vec.reset(seed=seed)
    trace = [(obs, info)]
    for actions in actions_list:
        trace.append(vec.step(actions))
    return trace


def test_vector_env_same_seed_same_trajectory(vocab_size, make_vec):
    vec_a, vec_b = make_vec(3, max_new_tokens=3), make_vec(3, max_new_tokens=3)
    eos = vec_a.core.eos_token_id
    rng = np.random.default_rng(0)
    actions_list = []
    for _ in range(9):
        actions = rng.integers(3, vocab_size, size=3)
        actions[rng.random(3) < 0.3] = eos
        actions_list.append(actions)
    trace_a = rollout_vector(vec_a, 7, actions_list)
    trace_b = rollout_vector(vec_b, 7, actions_list)
    n_ends = 0
    for t, (a, b) in enumerate(zip(trace_a, trace_b)):
        assert_same_obs(a[0], b[0], f"t={t}")
        assert_same_info(a[-1], b[-1], f"t={t}")
        if t:
            for i in (1, 2, 3):
                assert_same_value(a[i], b[i], f"t={t} item {i}")
            n_ends += int((a[2] | a[3]).sum())
    assert n_ends >= 3  # the run went through autoresets
    assert any("prompt" in step[-1] for step in trace_a[1:])  # an autoreset drew new prompts


def test_vector_env_different_seeds_give_different_prompts(make_vec):
    vec = make_vec(3)

    def prompts(seed):
        first = vec.reset(seed=seed)[1]["prompt_index"].tolist()
        return [first] + [vec.reset()[1]["prompt_index"].tolist() for _ in range(3)]

    assert prompts(5) == prompts(5)
    assert prompts(5) != prompts(6)
    assert len({tuple(p) for p in prompts(5)}) > 1


# --------------------------------------------------------------------------- 4. observation layout
def check_layout(obs, prompt_ids, response, pad_token_id, length):
    ids, mask = obs["input_ids"], obs["attention_mask"]
    n = len(prompt_ids) + len(response)
    assert ids.shape == mask.shape == (length,)
    assert mask[length - n :].tolist() == [1] * n
    assert mask[: length - n].tolist() == [0] * (length - n)
    assert ids[length - n :].tolist() == list(prompt_ids) + list(response)
    assert (ids[: length - n] == pad_token_id).all()
    if response:
        assert ids[-1] == response[-1]


def test_observation_layout(env, tokenizer):
    core = env.unwrapped.core
    obs, info = env.reset(seed=11)
    prompt_ids = tokenizer(info["prompt"])["input_ids"]
    assert info["prompt"] == core.prompts[info["prompt_index"]]
    check_layout(obs, prompt_ids, [], core.pad_token_id, 48)
    assert obs["input_ids"][-1] == prompt_ids[-1]
    # A PAD token chosen as an action is a real token of the response: the mask is 1 there.
    response = []
    for action in [17, core.pad_token_id, 23, 101]:
        obs, _, terminated, truncated, _ = env.step(action)
        response.append(action)
        assert not (terminated or truncated)
        check_layout(obs, prompt_ids, response, core.pad_token_id, 48)


def test_window_is_max_prompt_plus_max_new_tokens(tokenizer):
    env = gym.make(ENV_ID, prompts=[LONG_PROMPT], max_prompt_tokens=5, max_new_tokens=4, prompt_truncation="left")
    assert env.observation_space["input_ids"].shape == env.observation_space["attention_mask"].shape == (9,)
    obs, _ = env.reset(seed=0)
    prompt_ids = tokenizer(LONG_PROMPT)["input_ids"][-5:]
    response = [11, 12, 13, 14]
    for step, action in enumerate(response, 1):
        obs, _, terminated, truncated, _ = env.step(action)
        check_layout(obs, prompt_ids, response[:step], env.unwrapped.core.pad_token_id, 9)
    assert truncated and not terminated
    assert obs["attention_mask"].tolist() == [1] * 9  # the window is exactly full at the end


# --------------------------------------------------------------------------- 5. episode end
def test_eos_terminates(short_env):
    eos = short_env.unwrapped.core.eos_token_id
    short_env.reset(seed=0)
    _, reward, terminated, truncated, info = short_env.step(eos)
    assert terminated is True and truncated is False
    assert isinstance(info["score"], float) and np.isfinite(info["score"])
    assert info["response"] == ""  # EOS is a special token: not in the decoded response
    assert isinstance(reward, float)


def test_eos_on_the_last_allowed_step_terminates(short_env):
    eos = short_env.unwrapped.core.eos_token_id
    short_env.reset(seed=1)
    for step in range(2):
        _, _, terminated, truncated, info = short_env.step(non_eos_action(short_env, step))
        assert not terminated and not truncated
    _, _, terminated, truncated, info = short_env.step(eos)
    assert terminated is True and truncated is False
    assert "response" in info


def test_max_new_tokens_truncates(short_env, tokenizer):
    short_env.reset(seed=2)
    actions = [non_eos_action(short_env, step) for step in range(3)]
    for action in actions[:-1]:
        _, _, terminated, truncated, info = short_env.step(action)
        assert terminated is False and truncated is False
        assert info["score"] is None
        assert "response" not in info
        assert isinstance(info["ref_logprob"], float)
        assert info["kl_source"] == "reference_only"
        assert info["logprob"] is None and info["kl"] is None
    _, _, terminated, truncated, info = short_env.step(actions[-1])
    assert terminated is False and truncated is True
    assert isinstance(info["score"], float) and np.isfinite(info["score"])
    assert info["response"] == tokenizer.decode(actions, skip_special_tokens=True)
    assert info["response"] != ""


def test_reset_info_keys(short_env):
    _, info = short_env.reset(seed=0)
    assert set(info) == {"prompt", "prompt_index", "row"}
    assert isinstance(info["prompt"], str) and isinstance(info["prompt_index"], int)
    assert info["row"] == {}  # the review prompts carry no other columns


# --------------------------------------------------------------------------- 6. render
def test_render_ansi_returns_decoded_context():
    env = gym.make(ENV_ID, render_mode="ansi")
    _, info = env.reset(seed=0)
    text = env.render()
    assert isinstance(text, str)
    assert text.startswith(info["prompt"])
    tokenizer = env.unwrapped.core.tokenizer
    actions = [tokenizer.convert_tokens_to_ids("A"), 5, 6]
    for action in actions:
        env.step(action)
    text = env.render()
    assert text.startswith(info["prompt"])
    ids = tokenizer(info["prompt"])["input_ids"] + actions
    assert text == tokenizer.decode(ids)
    assert len(text) > len(info["prompt"])


def test_render_human_prints(capsys):
    env = gym.make(ENV_ID, render_mode="human")
    capsys.readouterr()
    _, info = env.reset(seed=0)
    out = capsys.readouterr().out
    assert out.startswith(info["prompt"])
    env.step(5)
    out_after_step = capsys.readouterr().out
    assert out_after_step.startswith(info["prompt"]) and len(out_after_step) > len(out)
    assert env.render() is None
    assert capsys.readouterr().out.startswith(info["prompt"])


# --------------------------------------------------------------------------- 7. reset options
def test_reset_prompt_index(env):
    prompts = load_prompts("train")
    for index in (0, 17, len(prompts) - 1):
        obs, info = env.reset(options={"prompt_index": index})
        assert info["prompt_index"] == index
        assert info["prompt"] == prompts[index]


@pytest.mark.parametrize("index", [-1, 224, 10_000])
def test_reset_prompt_index_out_of_range(env, index):
    assert len(env.unwrapped.core.prompts) == 224
    with pytest.raises(ValueError, match=r"prompt_index must lie in 0\.\.223"):
        env.reset(options={"prompt_index": index})


def test_reset_unknown_option(env):
    with pytest.raises(ValueError, match=r"unknown reset options \['prompt_idx'\]"):
        env.reset(options={"prompt_idx": 3})


def test_vector_reset_prompt_index(make_vec):
    vec = make_vec(3)
    prompts = load_prompts("train")
    _, info = vec.reset(seed=0, options={"prompt_index": 4})
    assert info["prompt_index"].tolist() == [4, 4, 4]
    _, info = vec.reset(options={"prompt_index": [1, 2, 3]})
    assert info["prompt_index"].tolist() == [1, 2, 3]
    assert info["prompt"].tolist() == prompts[1:4]
    with pytest.raises(ValueError, match="prompt_index must lie in"):
        vec.reset(options={"prompt_index": [1, 2, 224]})
    with pytest.raises(ValueError, match="unknown reset options"):
        vec.reset(options={"seed": 1})


@pytest.mark.parametrize("mode", [AutoresetMode.DISABLED, "Disabled"])
def test_vector_disabled_reset_mask_restarts_only_masked_slots(mode, tokenizer, make_vec):
    vec = make_vec(3, max_new_tokens=4, autoreset_mode=mode)
    assert vec.autoreset_mode == AutoresetMode.DISABLED
    eos = vec.core.eos_token_id
    obs, info = vec.reset(seed=0, options={"prompt_index": [0, 1, 2]})
    obs, *_ = vec.step(np.array([5, 6, 7]))
    obs, rewards, terminated, truncated, _ = vec.step(np.array([eos, 8, 9]))
    assert terminated.tolist() == [True, False, False]
    # In lockstep mode an ended slot ignores its action and earns 0 until it is reset.
    obs_ended, rewards, terminated, truncated, _ = vec.step(np.array([10, 11, 12]))
    assert rewards[0] == 0 and not terminated[0] and not truncated[0]
    np.testing.assert_array_equal(obs_ended["input_ids"][0], obs["input_ids"][0])

    mask = np.array([True, False, True])
    new_obs, info = vec.reset(options={"reset_mask": mask, "prompt_index": 9})
    for key in new_obs:
        np.testing.assert_array_equal(new_obs[key][1], obs_ended[key][1])  # slot 1 goes on untouched
    assert info["prompt_index"].tolist() == [9, 1, 9]
    prompt_ids = tokenizer(load_prompts("train")[9])["input_ids"]
    for slot in (0, 2):
        check_layout({k: v[slot] for k, v in new_obs.items()}, prompt_ids, [], vec.core.pad_token_id, 20)
    # Slot 1 still has one token left before truncation; the restarted slots have four.
    _, _, terminated, truncated, _ = vec.step(np.array([13, 14, 15]))
    assert truncated.tolist() == [False, True, False] and not terminated.any()


def test_vector_next_step_rejects_partial_reset_mask(make_vec):
    vec = make_vec(3)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="reset_mask needs autoreset_mode=DISABLED"):
        vec.reset(options={"reset_mask": np.array([True, False, True])})
    obs, info = vec.reset(options={"reset_mask": np.ones(3, dtype=bool), "prompt_index": 2})  # all slots is fine
    assert info["prompt_index"].tolist() == [2, 2, 2]


def test_vector_reset_mask_wrong_shape(make_vec):
    vec = make_vec(3, autoreset_mode="Disabled")
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"reset_mask must have shape \(3,\)"):
        vec.reset(options={"reset_mask": [True, False]})


def test_vector_first_reset_must_start_every_slot(make_vec):
    vec = make_vec(3, autoreset_mode="Disabled")
    with pytest.raises(ValueError, match="first reset must start every slot"):
        vec.reset(seed=0, options={"reset_mask": [True, False, True]})


# --------------------------------------------------------------------------- 8. bad input: actions
@pytest.mark.parametrize("offset", [-1, 0, 1000])
def test_action_outside_vocabulary(env, vocab_size, offset):
    action = -1 if offset == -1 else vocab_size + offset
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"action {action} is not a token id: .*Discrete\({vocab_size}\)"):
        env.step(action)
    # The rejected action changed nothing: the episode goes on from the same observation.
    assert_same_obs(env.unwrapped._observation(), obs)
    _, _, terminated, truncated, _ = env.step(5)
    assert not terminated and not truncated


@pytest.mark.parametrize("action", [1.5, "5", True, np.float32(3.0), [5], np.array([5, 6])])
def test_action_of_wrong_type(env, action):
    obs, _ = env.reset(seed=0)
    with pytest.raises(TypeError, match="action must be an integer token id"):
        env.step(action)
    assert_same_obs(env.unwrapped._observation(), obs)


@pytest.mark.parametrize("action", [5, np.int64(5), np.int32(5), np.array(5)])
def test_integer_like_actions_accepted(env, action):
    obs, _ = env.reset(seed=0)
    next_obs, *_ = env.step(action)
    assert next_obs["input_ids"][-1] == 5


def test_step_after_episode_end_without_reset(short_env):
    short_env.reset(seed=0)
    _, _, terminated, _, _ = short_env.step(short_env.unwrapped.core.eos_token_id)
    assert terminated
    with pytest.raises(RuntimeError, match="episode that has ended .* call reset"):
        short_env.step(5)
    short_env.reset()
    short_env.step(5)  # and a reset makes it steppable again


def test_step_before_reset_single():
    env = TokenGenerationEnv(max_new_tokens=3)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(5)


def test_vector_step_before_reset(make_vec):
    vec = make_vec(2)
    with pytest.raises(RuntimeError, match=r"step\(\) called before reset\(\)"):
        vec.step(np.array([5, 5]))


def test_vector_wrong_number_of_actions(make_vec):
    vec = make_vec(3)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected 3 actions .* shape \(2,\)"):
        vec.step(np.array([5, 6]))
    with pytest.raises(ValueError, match=r"expected 3 actions .* shape \(\)"):
        vec.step(5)


def test_vector_bad_actions(vocab_size, make_vec):
    vec = make_vec(3)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=rf"action {vocab_size} is not a token id"):
        vec.step(np.array([5, vocab_size, 6]))
    with pytest.raises(ValueError, match="action -1 is not a token id"):
        vec.step(np.array([-1, 5, 6]))
    with pytest.raises(TypeError, match="actions must be integer token ids"):
        vec.step(np.array([1.5, 2.0, 3.0]))


@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1), (3, 446), ()])
def test_vector_logprobs_wrong_shape(shape, make_vec):
    vec = make_vec(3)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"logprobs must hold one log-probability per slot, shape \(3,\)"):
        vec.step(np.array([5, 6, 7]), logprobs=np.full(shape, -1.0))


def test_vector_logprobs_right_shape_are_used(make_vec):
    vec = make_vec(3, kl_coef=0.5)
    vec.reset(seed=0)
    logprobs = np.array([-1.0, -2.0, -3.0])
    _, rewards, _, _, info = vec.step(np.array([5, 6, 7]), logprobs=logprobs)
    assert info["kl_source"].tolist() == ["caller"] * 3
    np.testing.assert_allclose(info["logprob"], logprobs)
    np.testing.assert_allclose(info["kl"], logprobs - info["ref_logprob"], rtol=1e-5)
    np.testing.assert_allclose(rewards, -0.5 * info["kl"], rtol=1e-5)


# --------------------------------------------------------------------------- 8. bad input: constructor
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kl_coef": -0.1}, ValueError, r"kl_coef must be >= 0 .*got -0\.1"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1, got 0"),
        ({"max_prompt_tokens": 0}, ValueError, "max_prompt_tokens must be >= 1, got 0"),
        ({"temperature": 0}, ValueError, "temperature must be > 0 .*got 0"),
        ({"temperature": -1}, ValueError, "temperature must be > 0 .*got -1"),
        ({"temperature": float("nan")}, ValueError, "temperature must be > 0"),
        ({"reward_mode": "final"}, ValueError, r"reward_mode must be one of \('sparse', 'dense'\), got 'final'"),
        ({"prompt_truncation": "right"}, ValueError, "prompt_truncation must be one of"),
        ({"prompts": []}, ValueError, "prompts must be a non-empty list of strings"),
        ({"prompts": ["fine", 3]}, ValueError, "prompts must be a non-empty list of strings"),
        ({"prompts": [""]}, ValueError, "prompt 0 .* is empty after tokenization"),
        ({"max_new_tokens": 200}, ValueError, "exceeds the reference model's 128 positions"),
    ],
)
def test_invalid_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        gym.make(ENV_ID, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kl_coef": -1.0}, "kl_coef must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"render_mode": "rgb_array"}, "render_mode must be one of"),
        ({"num_envs": 0}, "num_envs must be at least 1"),
        ({"autoreset_mode": "SameStep"}, "autoreset_mode must be NEXT_STEP or DISABLED"),
    ],
)
def test_invalid_vector_constructor_arguments(kwargs, message):
    kwargs = {"num_envs": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        gym.make_vec(ENV_ID, vectorization_mode="vector_entry_point", **kwargs)


@pytest.mark.parametrize("render_mode", ["rgb_array", "ANSI"])
def test_invalid_render_mode(render_mode):
    # The env class directly: gym.make would add its own warning about the unknown render mode first.
    with pytest.raises(
        ValueError, match=rf"render_mode must be one of \['ansi', 'human'\] or None, got '{render_mode}'"
    ):
        TokenGenerationEnv(render_mode=render_mode)
    with pytest.raises(ValueError, match="render_mode must be one of"):
        TokenGenerationVectorEnv(num_envs=2, render_mode=render_mode)


def test_prompt_longer_than_max_prompt_tokens_raises_by_default():
    with pytest.raises(
        ValueError, match=r"prompt 1 has 21 tokens, more than max_prompt_tokens=16.*prompt_truncation='left'"
    ):
        gym.make(ENV_ID, prompts=["short one", LONG_PROMPT])


def test_prompt_truncation_left_keeps_last_tokens(tokenizer):
    env = gym.make(ENV_ID, prompts=["short one", LONG_PROMPT], prompt_truncation="left", max_new_tokens=4)
    full = tokenizer(LONG_PROMPT)["input_ids"]
    assert len(full) == 21
    obs, info = env.reset(options={"prompt_index": 1})
    assert info["prompt"] == LONG_PROMPT
    check_layout(obs, full[-16:], [], env.unwrapped.core.pad_token_id, 20)
    obs, _ = env.reset(options={"prompt_index": 0})  # short prompts are untouched
    check_layout(obs, tokenizer("short one")["input_ids"], [], env.unwrapped.core.pad_token_id, 20)


def test_tokenizer_and_reference_vocabularies_disagree():
    small = GPT2LMHeadModel(tiny_gpt2_config(10))
    with pytest.raises(ValueError, match="the tokenizer has 446 tokens but the reference model predicts only 10"):
        gym.make(ENV_ID, reference_model=small, tokenizer=POLICY_DIR)


def test_tokenizer_and_reward_model_vocabularies_disagree():
    small = GPT2ForSequenceClassification(tiny_gpt2_config(10, num_labels=1))
    with pytest.raises(ValueError, match="the tokenizer has 446 tokens but the reward model embeds only 10"):
        gym.make(ENV_ID, reward_model=small)


def test_loaded_reference_model_needs_tokenizer():
    model = GPT2LMHeadModel(tiny_gpt2_config(446))
    with pytest.raises(ValueError, match="pass tokenizer= when reference_model is a loaded module"):
        gym.make(ENV_ID, reference_model=model)


@pytest.mark.parametrize("reward_mode", ["sparse", "dense"])
def test_reward_model_with_two_outputs_is_rejected_at_construction(vocab_size, reward_mode):
    torch.manual_seed(0)
    two_labels = GPT2ForSequenceClassification(tiny_gpt2_config(vocab_size, num_labels=2))
    with pytest.raises(
        ValueError, match=r"one scalar per sequence, shape \(batch, 1\), but gave \(1, 2\).*num_labels=1"
    ):
        gym.make(ENV_ID, reward_model=two_labels, reward_mode=reward_mode, max_new_tokens=3)


@pytest.mark.parametrize("argument", ["reference_model", "reward_model", "tokenizer"])
def test_model_path_that_does_not_exist(tmp_path, argument):
    missing = tmp_path / "no_such_model"
    extra = {"tokenizer": POLICY_DIR} if argument == "reference_model" else {}
    what = argument.replace("_model", " model")
    with pytest.raises(FileNotFoundError, match=rf"{what} path '{missing}' does not exist"):
        gym.make(ENV_ID, **{argument: str(missing)}, **extra)
    with pytest.raises(FileNotFoundError, match=rf"{what} path '{missing}' does not exist"):
        gym.make(ENV_ID, **{argument: missing}, **extra)  # a pathlib.Path too


def test_reference_model_path_missing_without_tokenizer_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"reference model .*'{missing}' does not exist"):
        gym.make(ENV_ID, reference_model=missing)


def test_prompts_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "prompts.txt"
    with pytest.raises(FileNotFoundError, match=f"prompts file '{missing}' does not exist"):
        gym.make(ENV_ID, prompts=missing)
    with pytest.raises(FileNotFoundError, match=f"prompts file '{missing}' does not exist"):
        gym.make(ENV_ID, prompts=str(missing))


def test_dataset_without_prompt_column():
    dataset = FakeDataset({"text": ["a b"], "label": [1]})
    with pytest.raises(ValueError, match=r"no column 'prompt' \(it has \['text', 'label'\]\); pass prompt_column="):
        gym.make(ENV_ID, prompts=dataset)
    with pytest.raises(ValueError, match="no column 'query'"):
        gym.make(ENV_ID, prompts=dataset, prompt_column="query")


# --------------------------------------------------------------------------- 9. prompt sources
PROMPTS = ["The movie was", "I thought the acting was", "Overall the cast is"]


def assert_prompts(env, expected):
    assert env.unwrapped.core.prompts == expected
    for index, prompt in enumerate(expected):
        _, info = env.reset(options={"prompt_index": index})
        assert info["prompt"] == prompt and info["prompt_index"] == index
    with pytest.raises(ValueError, match=f"0..{len(expected) - 1}"):
        env.reset(options={"prompt_index": len(expected)})


def test_prompts_from_list():
    assert_prompts(gym.make(ENV_ID, prompts=PROMPTS), PROMPTS)
    assert_prompts(gym.make(ENV_ID, prompts=tuple(PROMPTS)), PROMPTS)


def test_prompts_from_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    assert_prompts(gym.make(ENV_ID, prompts=path), PROMPTS)
    assert_prompts(gym.make(ENV_ID, prompts=str(path)), PROMPTS)


def test_prompts_from_dataset():
    dataset = FakeDataset({"prompt": PROMPTS, "label": [0, 1, 2]})
    assert_prompts(gym.make(ENV_ID, prompts=dataset), PROMPTS)
    other = FakeDataset({"query": PROMPTS[::-1]})
    assert_prompts(gym.make(ENV_ID, prompts=other, prompt_column="query"), PROMPTS[::-1])


def test_default_prompts_are_the_train_split(env):
    assert env.unwrapped.core.prompts == load_prompts("train")


def test_vector_env_prompts_from_list(make_vec):
    vec = make_vec(2, prompts=PROMPTS)
    _, info = vec.reset(options={"prompt_index": [2, 0]})
    assert info["prompt"].tolist() == [PROMPTS[2], PROMPTS[0]]


# --------------------------------------------------------------------------- 10. frozen models
def assert_frozen(model):
    assert not model.training
    assert all(not module.training for module in model.modules())
    assert all(not parameter.requires_grad for parameter in model.parameters())


def test_default_models_are_frozen(env):
    core = env.unwrapped.core
    assert_frozen(core.reference.model)
    assert_frozen(core.reward_model)


def test_passed_models_are_frozen(vocab_size, make_vec):
    reference = GPT2LMHeadModel(tiny_gpt2_config(vocab_size)).train()
    reward_model = GPT2ForSequenceClassification(tiny_gpt2_config(vocab_size, num_labels=1)).train()
    assert reference.training and all(p.requires_grad for p in reference.parameters())
    env = gym.make(ENV_ID, reference_model=reference, reward_model=reward_model, tokenizer=POLICY_DIR)
    core = env.unwrapped.core
    assert core.reference.model is reference and core.reward_model is reward_model
    assert_frozen(core.reference.model)
    assert_frozen(core.reward_model)
    vec = make_vec(2)
    assert_frozen(vec.core.reference.model)
    assert_frozen(vec.core.reward_model)


def test_package_exports():
    assert {"TokenGenerationEnv", "TokenGenerationVectorEnv"} <= set(textenv.__all__)
    assert (
        textenv.TokenGenerationEnv is TokenGenerationEnv
        and textenv.TokenGenerationVectorEnv is TokenGenerationVectorEnv
    )


def test_failed_vector_step_restarts_no_slot(make_vec):
    vec = make_vec(3, max_new_tokens=3)
    vec.reset(seed=0, options={"prompt_index": [0, 1, 2]})
    eos = vec.core.eos_token_id
    vec.step(np.array([eos, 5, 5]))  # slot 0 ends; NEXT_STEP restarts it on the next step
    before = vec.core.prompt_index.copy()
    with pytest.raises(ValueError, match="expected 3 actions"):
        vec.step(np.array([5, 5]))
    assert np.array_equal(vec.core.prompt_index, before)
    with pytest.raises(ValueError, match="logprobs must hold one log-probability per slot"):
        vec.step(np.array([5, 5, 5]), logprobs=np.zeros(2))
    assert np.array_equal(vec.core.prompt_index, before)


@pytest.mark.parametrize(
    "index, message",
    [([0, 1], "one int or 3 ints"), ([], "an int or a list of ints"), (1.5, "an int or a list of ints")],
)
def test_vector_reset_prompt_index_bad_values(index, message, make_vec):
    with pytest.raises(ValueError, match=message):
        make_vec(3).reset(seed=0, options={"prompt_index": index})


def test_single_env_rejects_reset_mask(env):
    with pytest.raises(ValueError, match=r"unknown reset options \['reset_mask'\]"):
        env.reset(seed=0, options={"reset_mask": [True]})


def test_render_without_render_mode_warns_and_returns_none():
    plain = TokenGenerationEnv()
    plain.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert plain.render() is None


def test_kl_coef_can_be_changed_between_episodes(make_vec):
    vec = make_vec(2, kl_coef=0.1)
    vec.reset(seed=0, options={"prompt_index": 0})
    _, first, *_ = vec.step(np.array([5, 5]))
    vec.kl_coef = 0.2  # an adaptive KL controller does this between rollouts
    vec.reset(seed=0, options={"prompt_index": 0})
    _, second, *_ = vec.step(np.array([5, 5]))
    np.testing.assert_allclose(second, 2 * first, rtol=1e-6)  # reference-only reward: kl_coef * ref_logprob
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        vec.kl_coef = -1.0


def test_vector_reset_group_size_gives_identical_prompts_within_groups(make_vec):
    vec = make_vec(6)
    _, info = vec.reset(seed=3, options={"group_size": 3})
    index = info["prompt_index"]
    assert (index[:3] == index[0]).all() and (index[3:] == index[3]).all()
    obs = vec.core.observation()
    assert (obs["input_ids"][:3] == obs["input_ids"][0]).all()
    with pytest.raises(ValueError, match="group_size must be a positive int dividing the 6"):
        vec.reset(options={"group_size": 4})
    with pytest.raises(ValueError, match="either prompt_index or group_size"):
        vec.reset(options={"group_size": 3, "prompt_index": 0})


# --------------------------------------------------------------------------- what learners read of the env
@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
def test_prompts_rows_and_answer_check_are_public(vector, make_env, make_vec):
    rows = [{"prompt": "17+25=", "answer": "42"}, {"prompt": "3+4=", "answer": "7"}]
    env = make_vec(2, task="arithmetic", prompts=rows) if vector else make_env(task="arithmetic", prompts=rows)
    assert list(env.unwrapped.prompts) == ["17+25=", "3+4="]
    assert list(env.unwrapped.rows) == [{"answer": "42"}, {"answer": "7"}]
    assert env.unwrapped.accuracy_term == "exact_match"
    _, info = env.reset(seed=0, options={"prompt_index": 1} if not vector else {"prompt_index": [1, 0]})
    first = info["row"] if not vector else info["row"][0]
    assert first == env.unwrapped.rows[1]
    reviews = make_vec(2) if vector else make_env()
    assert reviews.unwrapped.accuracy_term is None and len(reviews.unwrapped.prompts) == 224


def test_the_learners_read_the_env_only_through_its_public_api():
    """agents/ uses the envs' documented properties (textenv.env.CoreView) and info keys (textenv.info), never
    the core they are views of."""
    import agents

    root = Path(agents.__file__).parent
    reaching = [
        f"{path.relative_to(root.parent)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "unwrapped.core" in line or "textenv.core" in line or ".core." in line
    ]
    assert reaching == []
