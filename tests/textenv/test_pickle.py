"""A TokenRLHF-v0 env pickles mid-episode: the copy carries its models, KV caches, RNG and episode state.

The original and its copies, stepped with the same actions afterwards (interleaved, so shared state would
show), give the same observations, rewards, episode ends and infos, across an episode end and a reset.

Two copies agree bit for bit. The original agrees with them exactly in everything discrete and to float32
rounding in the floats: ``from_pretrained`` leaves the weights at addresses that are not 64-byte aligned,
unpickled weights are aligned, and CPU matmul kernels sum in a different order on the two (a 1-ulp
difference in a log-prob now and then). Re-allocating the original's weights makes it bitwise equal too.
"""

import pickle

import numpy as np

MAX_NEW = 6


def assert_same(a, b, exact: bool) -> None:
    """Equal results from two envs (NaN equal to NaN); floats to float32 rounding unless ``exact``."""
    if isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, exact)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], exact)
    elif not exact and np.asarray(a).dtype.kind == "f":
        assert np.asarray(b).dtype == np.asarray(a).dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
    else:
        np.testing.assert_equal(a, b)


def step_all(envs, action):
    """Step (or, for ``action`` None, reset without a seed) every env; check their results agree."""
    results = [env.reset() if action is None else env.step(action) for env in envs]
    original, copy, second_copy = results
    assert_same(original, copy, exact=False)
    assert_same(copy, second_copy, exact=True)
    return original


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
