"""TokenGenerationVectorEnv (textenv/vector_env.py): the batched env as a learner drives it.

1. Spaces batched from the single env's, seeding, and the autoreset modes with their reset masks.
2. Reset options (prompt_index, group_size), actions and caller log-probs of the wrong shape, a failed step.
3. Constructor arguments: num_envs, autoreset_mode, render_mode and the settings it shares with the single env.
4. ``kl_coef`` changed between episodes; pickling mid-episode (the single env's in test_env.py).

Everything runs offline on the embedded default task, on the env's default device as a user gets it.
"""

import functools
import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from tests.models import assert_same_info, assert_same_obs, assert_same_value, check_layout, step_all
from textenv import TokenGenerationVectorEnv
from textenv.default_task import load_prompts

ENV_ID = "TokenRLHF-v0"


@pytest.fixture(scope="module")
def make_vec(make_vec):
    """The shared vector-env factory (tests/conftest.py) on the env's default device, as a user gets it."""
    return functools.partial(make_vec, device=None)


# --------------------------------------------------------------------------- 1. spaces
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


# --------------------------------------------------------------------------- 2. seeding and determinism
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


# --------------------------------------------------------------------------- 3. reset options and autoreset
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


@pytest.mark.parametrize(
    "index, message",
    [([0, 1], "one int or 3 ints"), ([], "an int or a list of ints"), (1.5, "an int or a list of ints")],
)
def test_vector_reset_prompt_index_bad_values(index, message, make_vec):
    with pytest.raises(ValueError, match=message):
        make_vec(3).reset(seed=0, options={"prompt_index": index})


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


# --------------------------------------------------------------------------- 4. actions and log-probs
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


# --------------------------------------------------------------------------- 5. constructor arguments
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


@pytest.mark.parametrize("num_envs", [2.5, True], ids=["float", "bool"])
def test_vector_num_envs_of_wrong_type(num_envs):
    with pytest.raises(TypeError, match=rf"num_envs must be an int, got {num_envs!r}"):
        gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", device="cpu")


# --------------------------------------------------------------------------- 6. kl_coef and pickling
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


MAX_NEW = 6


def test_vector_env_pickles_mid_episode(make_vec):
    vec = make_vec(3, max_new_tokens=MAX_NEW, device=None)  # NEXT_STEP autoreset
    eos = vec.unwrapped.core.eos_token_id
    vocab = vec.single_action_space.n
    rng = np.random.default_rng(0)
    vec.reset(seed=0)
    for _ in range(2):
        vec.step(rng.integers(vocab, size=3))
    data = pickle.dumps(vec)
    envs = [vec, pickle.loads(data), pickle.loads(data)]
    assert envs[1].core is not vec.core

    # steps 0-3 finish the first episodes (truncated), step 4 autoresets every row with prompts drawn from
    # the carried RNG, and row 1 emits EOS as the 4th token of its second episode
    for step in range(9):
        actions = rng.integers(vocab, size=3)
        if step == 8:
            actions[1] = eos
        _, _, terminated, truncated, _ = step_all(envs, actions)
        if step == 3:
            assert truncated.all() and not terminated.any()
    assert terminated[1]
