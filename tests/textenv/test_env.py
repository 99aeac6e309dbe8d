"""TokenGenerationEnv (textenv/env.py): the single env as a user drives it.

1. Its registration, Gymnasium's and SB3's env checkers, spaces, seeding and the observation layout.
2. Episode ends, render modes, reset options, and actions valid or not.
3. ``kl_coef``: non-finite values are refused by the setter, a new value reaches the env and its rewards.
4. It pickles mid-episode: the copy carries its models, KV caches, RNG and episode state (see test_vector_env.py).
5. What learners read of it: prompts, rows and the answer check, only through the public API.

Everything runs offline on the embedded default task.
"""

import pickle
import re
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import textenv
from tests.models import assert_same_info, assert_same_obs, check_layout, step_all
from textenv import TokenGenerationEnv, TokenGenerationVectorEnv
from textenv.default_task import load_prompts

ENV_ID = "TokenRLHF-v0"
LONG_PROMPT = (
    "I thought the acting was great and the plot was moving and the soundtrack was excellent and the cast was superb"
)
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


# --------------------------------------------------------------------------- helpers and fixtures
@pytest.fixture(scope="module")
def single_env(make_env):
    """A single env shared by the tests that leave it as they found it (they reset it first)."""
    env = make_env(max_new_tokens=4)
    yield env
    env.close()


@pytest.fixture(scope="module")
def short_env():
    """Three new tokens per episode: quick episode ends."""
    env = gym.make(ENV_ID, max_new_tokens=3)
    yield env
    env.close()


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


def test_package_exports():
    assert {"TokenGenerationEnv", "TokenGenerationVectorEnv"} <= set(textenv.__all__)
    assert (
        textenv.TokenGenerationEnv is TokenGenerationEnv
        and textenv.TokenGenerationVectorEnv is TokenGenerationVectorEnv
    )


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


# --------------------------------------------------------------------------- 4. observation layout
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


def test_render_without_render_mode_warns_and_returns_none():
    plain = TokenGenerationEnv()
    plain.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert plain.render() is None


@pytest.mark.parametrize("render_mode", ["rgb_array", "ANSI"])
def test_invalid_render_mode(render_mode):
    # The env class directly: gym.make would add its own warning about the unknown render mode first.
    with pytest.raises(
        ValueError, match=rf"render_mode must be one of \['ansi', 'human'\] or None, got '{render_mode}'"
    ):
        TokenGenerationEnv(render_mode=render_mode)
    with pytest.raises(ValueError, match="render_mode must be one of"):
        TokenGenerationVectorEnv(num_envs=2, render_mode=render_mode)


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


def test_single_env_rejects_reset_mask(env):
    with pytest.raises(ValueError, match=r"unknown reset options \['reset_mask'\]"):
        env.reset(seed=0, options={"reset_mask": [True]})


@pytest.mark.parametrize("options", [[("prompt_index", 0)], "x"], ids=["list-of-pairs", "str"])
@pytest.mark.parametrize("which", ["single", "vector"])
def test_reset_options_must_be_a_dict(which, options, single_env, vec_env):
    env = single_env if which == "single" else vec_env
    with pytest.raises(TypeError, match=r"options must be a dict \(or None\)"):
        env.reset(options=options)


# --------------------------------------------------------------------------- 8. actions
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


# --------------------------------------------------------------------------- 9. kl_coef
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


# --------------------------------------------------------------------------- 10. pickling
MAX_NEW = 6


def test_single_env_pickles_mid_episode(make_env):
    env = make_env(max_new_tokens=MAX_NEW, device=None)  # the env's default device, as a user gets it
    eos = env.unwrapped.core.eos_token_id
    vocab = env.action_space.n
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(2):
        env.step(int(rng.integers(vocab)))
    data = pickle.dumps(env)
    envs = [env, pickle.loads(data), pickle.loads(data)]
    assert envs[1].unwrapped.core is not env.unwrapped.core

    # finish the episode (truncated at MAX_NEW), reset without a seed (the RNG carried over), then end by EOS
    actions = [int(rng.integers(vocab)) for _ in range(MAX_NEW - 2)] + [None] + [int(rng.integers(vocab)), eos]
    for index, action in enumerate(actions):
        result = step_all(envs, action)
        if index == MAX_NEW - 3:
            assert result[3] and not result[2]  # truncated at MAX_NEW
    assert result[2] and not result[3]  # the second episode ended by EOS


# --------------------------------------------------------------------------- 11. what learners read
@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
def test_prompts_rows_and_answer_check_are_public(vector, make_env, make_vec):
    rows = [{"prompt": "17+25=", "answer": "42"}, {"prompt": "3+4=", "answer": "7"}]
    env = (
        make_vec(2, task="arithmetic", prompts=rows, device=None)
        if vector
        else make_env(task="arithmetic", prompts=rows)
    )
    assert list(env.unwrapped.prompts) == ["17+25=", "3+4="]
    assert list(env.unwrapped.rows) == [{"answer": "42"}, {"answer": "7"}]
    assert env.unwrapped.accuracy_term == "exact_match"
    _, info = env.reset(seed=0, options={"prompt_index": 1} if not vector else {"prompt_index": [1, 0]})
    first = info["row"] if not vector else info["row"][0]
    assert first == env.unwrapped.rows[1]
    reviews = make_vec(2, device=None) if vector else make_env()
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
