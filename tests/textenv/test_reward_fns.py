"""Reward functions: every signature, weights, per-term info, errors, rows reaching them, the step hook.

The default task's policy samples the episodes; each test recomputes what the
env should pay from the episode's own tokens (the reward model's score by an
uncached forward, the functions by calling them again) and compares. Reward values and
weights must fit float32, weighted and summed; a function that edits its row changes nothing.
"""

import functools
import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from tests.models import end_episodes, lockstep_vec, uncached_score, zero
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.loading import read_prompt_rows
from textenv.reward_fns import RewardFunctionError, batched, resolve_reward_fns

ROWS = [
    {"prompt": "The movie was", "target": 3, "tag": "a"},
    {"prompt": "I thought the film", "target": 5, "tag": "b"},
]


def length_reward(prompt, response, response_ids, row):
    """Pays 1 when the response has ``row["target"]`` tokens, else minus the distance."""
    return 1.0 if len(response_ids) == row["target"] else -abs(len(response_ids) - row["target"]) / 10


def starts_with_space(prompt, response, **kwargs):
    return response.startswith(" ")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


def run_episode(env, seed=0, prompt_index=None):
    """Reset and step the policy-free env with tokens from its own action space; returns the transitions."""
    options = None if prompt_index is None else {"prompt_index": prompt_index}
    _, reset_info = env.reset(seed=seed, options=options)
    rng = np.random.default_rng(seed)
    steps = []
    done = False
    while not done:
        action = int(rng.integers(env.action_space.n))
        _, reward, terminated, truncated, info = env.step(action)
        steps.append((action, reward, info))
        done = terminated or truncated
    return reset_info, steps


# --------------------------------------------------------------------------- signatures and weights
def test_per_episode_function_without_a_reward_model_pays_its_value_and_loads_no_reward_model(make_env):
    env = make_env(reward_fns=[length_reward], prompts=ROWS, max_new_tokens=6)
    assert env.unwrapped.core.reward_model is None  # nothing loaded: only the function pays
    for seed in range(4):
        reset_info, steps = run_episode(env, seed)
        actions = [a for a, _, _ in steps]
        expected = length_reward("", "", actions, reset_info["row"])
        last = steps[-1][2]
        assert last["reward/length_reward"] == pytest.approx(expected)
        assert last["score"] == pytest.approx(expected)
        assert "reward/reward_model" not in last
        # the score arrives on the last step only, beside the per-step KL term
        for _, reward, info in steps[:-1]:
            assert info["reward/length_reward"] is None
            assert reward == pytest.approx(info["non_score_reward"])
        assert steps[-1][1] == pytest.approx(last["non_score_reward"] + expected)


def test_reward_model_plus_weighted_functions_on_one_env(make_env, tokenizer):
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR).eval()
    env = make_env(
        reward_model=REWARD_MODEL_DIR,
        reward_fns={"length": length_reward, "space": starts_with_space},
        reward_weights=[0.5, 2.0],
        prompts=ROWS,
        max_new_tokens=5,
    )
    for seed in range(3):
        reset_info, steps = run_episode(env, seed)
        actions = [a for a, _, _ in steps]
        last = steps[-1][2]
        prompt_ids = env.unwrapped.core.prompt_ids[reset_info["prompt_index"]]
        rm_score = uncached_score(reward_model, prompt_ids + actions)
        length = length_reward("", "", actions, reset_info["row"])
        space = float(last["response"].startswith(" "))  # info's response is the one the functions read
        assert last["reward/reward_model"] == pytest.approx(rm_score, abs=1e-5)
        assert last["reward/length"] == pytest.approx(length)  # raw, unweighted
        assert last["reward/space"] == space
        assert last["score"] == pytest.approx(rm_score + 0.5 * length + 2.0 * space, abs=1e-5)
        assert steps[-1][1] == pytest.approx(last["non_score_reward"] + last["score"], abs=1e-5)


def test_info_response_is_the_text_the_reward_functions_read(make_env, tokenizer):
    seen = []

    def record(response, **kwargs):
        seen.append(response)
        return 0.0

    env = make_env(reward_fns=[record], prompts=ROWS, max_new_tokens=5)
    for seed in range(4):
        reset_info, steps = run_episode(env, seed)
        prompt_ids = env.unwrapped.core.prompt_ids[reset_info["prompt_index"]]
        whole = tokenizer.decode(prompt_ids + [a for a, _, _ in steps], skip_special_tokens=True)
        head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert steps[-1][2]["response"] == seen[-1] == whole[len(head) :]  # decoded after the prompt: its space kept
    assert any(text.startswith(" ") for text in seen)  # the case a bare decode of the response would get wrong


def test_batched_function_scores_every_episode_that_ended_in_one_call(make_vec):
    calls = []

    @batched
    def count_tokens(prompts, responses, response_ids, rows):
        calls.append(len(prompts))
        return [float(len(ids)) for ids in response_ids]

    env = make_vec(4, "Disabled", reward_fns=[count_tokens], prompts=ROWS, max_new_tokens=3)
    env.reset(seed=0)
    eos = env.unwrapped.tokenizer.eos_token_id
    # two slots stop at once on the first step, the others are truncated together on the third
    _, _, _, _, info = env.step(np.array([eos, eos, 7, 7]))
    assert calls == [2]
    np.testing.assert_array_equal(info["reward/count_tokens"][:2], [1.0, 1.0])
    assert np.isnan(info["reward/count_tokens"][2:]).all()
    np.testing.assert_array_equal(info["_reward/count_tokens"], [True, True, False, False])
    env.step(np.array([7, 7, 7, 7]))
    _, _, _, truncated, info = env.step(np.array([7, 7, 7, 7]))
    assert calls == [2, 2] and truncated[2:].all()
    np.testing.assert_array_equal(info["reward/count_tokens"][2:], [3.0, 3.0])


def test_functions_by_name_partial_and_module_path(make_env, tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text("def always_two(**kwargs):\n    return 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    half_length = functools.partial(lambda prompt, response, response_ids, row, scale: scale * len(response_ids))
    scaled = functools.partial(half_length.func, scale=0.5)
    env = make_env(reward_fns=["my_rewards:always_two", scaled], prompts=ROWS, max_new_tokens=4)
    _, steps = run_episode(env, 1)
    last = steps[-1][2]
    assert last["reward/always_two"] == 2.0
    assert last["reward/<lambda>"] == 0.5 * len(steps)
    assert last["score"] == pytest.approx(2.0 + 0.5 * len(steps))


# --------------------------------------------------------------------------- rows
def test_rows_reach_the_function_and_the_reset_info_from_a_list_a_jsonl_file_and_a_dataset(make_env, tmp_path):
    seen = []

    def record(prompt, response, response_ids, row):
        seen.append((prompt, row))
        return 0.0

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    class Dataset:  # the part of datasets.Dataset the env reads
        column_names = ["question", "target", "tag"]

        def __getitem__(self, column):
            key = "prompt" if column == "question" else column
            return [row[key] for row in ROWS]

    sources = [(ROWS, "prompt"), (str(path), "prompt"), (Dataset(), "question")]
    for source, column in sources:
        seen.clear()
        env = make_env(reward_fns=[record], prompts=source, prompt_column=column, max_new_tokens=2)
        for index in (0, 1):
            reset_info, _ = run_episode(env, index, prompt_index=index)
            assert reset_info["row"] == {"target": ROWS[index]["target"], "tag": ROWS[index]["tag"]}
        assert seen == [(ROWS[i]["prompt"], {"target": ROWS[i]["target"], "tag": ROWS[i]["tag"]}) for i in (0, 1)]


def test_vector_env_reset_info_carries_each_slot_row(make_vec):
    env = make_vec(2, "Disabled", reward_fns=[length_reward], prompts=ROWS, max_new_tokens=2)
    _, info = env.reset(seed=0, options={"prompt_index": [1, 0]})
    assert [row["tag"] for row in info["row"]] == ["b", "a"]


def test_rows_must_all_be_rows_and_name_the_prompt_key(make_env):
    with pytest.raises(ValueError, match="mixes data rows"):
        make_env(reward_fns=[length_reward], prompts=[ROWS[0], "plain text"])
    with pytest.raises(ValueError, match=r"row 0 has no 'question' key.*prompt_column"):
        make_env(reward_fns=[length_reward], prompts=ROWS, prompt_column="question")


def test_a_dataset_dict_gives_the_split_asked_for_eval_finding_test():

    class Split:
        def __init__(self, rows):
            self.rows, self.column_names = rows, list(rows[0])

        def __getitem__(self, column):
            return [row[column] for row in self.rows]

    class DatasetDict(dict):
        @property
        def column_names(self):
            return {name: split.column_names for name, split in self.items()}

    data = DatasetDict(train=Split(ROWS[:1]), test=Split(ROWS[1:]))
    assert read_prompt_rows(data, split="train")[0] == ["The movie was"]
    assert read_prompt_rows(data, split="eval")[0] == ["I thought the film"]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], not 'validation'"):
        read_prompt_rows(data, split="validation")


# --------------------------------------------------------------------------- the step hook
def test_step_reward_hook_pays_each_token_and_sums_with_the_final_score(make_env, make_vec):
    """Hand-computed episode: the hook pays 0.1 times the response length so far, so an episode of n tokens
    collects 0.1 * n (n + 1) / 2 from it, beside the KL terms and the final score."""

    def hook(prompt, response_ids, row):
        return 0.1 * len(response_ids)

    env = make_env(reward_fns=[length_reward], step_reward_fn=hook, prompts=ROWS, max_new_tokens=5)
    for seed in range(3):
        reset_info, steps = run_episode(env, seed)
        n = len(steps)
        for t, (_, reward, info) in enumerate(steps, start=1):
            assert info["step_reward"] == pytest.approx(0.1 * t)
            final = info["score"] if t == n else 0.0
            assert reward == pytest.approx(info["non_score_reward"] + 0.1 * t + final, abs=1e-6)
        total = sum(reward for _, reward, _ in steps)
        non_score = sum(info["non_score_reward"] for _, _, info in steps)
        score = length_reward("", "", [a for a, _, _ in steps], reset_info["row"])
        assert total == pytest.approx(non_score + 0.1 * n * (n + 1) / 2 + score, abs=1e-5)

    vec = make_vec(3, "Disabled", step_reward_fn=hook, reward_fns=[length_reward], prompts=ROWS, max_new_tokens=3)
    vec.reset(seed=0)
    eos = vec.unwrapped.tokenizer.eos_token_id
    _, _, _, _, info = vec.step(np.array([eos, 5, 5]))
    np.testing.assert_allclose(info["step_reward"], [0.1, 0.1, 0.1], rtol=1e-6)
    _, _, _, _, info = vec.step(np.array([5, 5, 5]))
    assert np.isnan(info["step_reward"][0])  # ended: no hook call, no reward
    np.testing.assert_allclose(info["step_reward"][1:], [0.2, 0.2], rtol=1e-6)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda **kw: float("nan"), ValueError, r"reward function '<lambda>' returned nan .* finite"),
        (lambda **kw: None, TypeError, r"'<lambda>' returned None .* must return a number"),
        (lambda **kw: "1.0", TypeError, r"returned '1.0' \(a str\)"),
        (lambda **kw: 1 / 0, RewardFunctionError, r"'<lambda>' raised ZeroDivisionError"),
        (lambda prompt: 1.0, RewardFunctionError, r"raised TypeError.*keyword arguments prompt, response"),
    ],
)
def test_bad_returns_and_exceptions_name_the_function(make_env, fn, error, match):
    env = make_env(reward_fns=[fn], prompts=ROWS, max_new_tokens=2)
    with pytest.raises(error, match=match):
        run_episode(env)


def test_a_batched_function_returning_the_wrong_number_of_values_is_named(make_vec):
    @batched
    def short(prompts, responses, response_ids, rows):
        return [1.0] * (len(prompts) - 1)

    env = make_vec(2, "Disabled", reward_fns=[short], prompts=ROWS, max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"batched reward function 'short' returned 1 values for 2 episodes"):
        env.step(np.array([5, 5]))


def test_bad_specs_weights_and_names_are_refused_before_loading():
    with pytest.raises(ValueError, match="must be written module:function"):
        resolve_reward_fns(["no_colon"], None)
    with pytest.raises(ImportError, match="cannot import module 'not_a_module_xyz'"):
        resolve_reward_fns(["not_a_module_xyz:f"], None)
    with pytest.raises(ImportError, match="'textenv' has no attribute 'nope'"):
        resolve_reward_fns(["textenv:nope"], None)
    with pytest.raises(ValueError, match="'math:nope' names Python's standard library"):
        resolve_reward_fns(["math:nope"], None)
    with pytest.raises(ValueError, match=r"reward_weights has 1 values for 2 reward functions"):
        resolve_reward_fns([length_reward, starts_with_space], [1.0])
    with pytest.raises(ValueError, match=r"the weight of reward function 'length_reward' must be a finite"):
        resolve_reward_fns([length_reward], [float("inf")])
    with pytest.raises(ValueError, match=r"\['length_reward'\] clash"):
        resolve_reward_fns([length_reward, length_reward], None)
    with pytest.raises(ValueError, match="not 'reward_model'"):
        resolve_reward_fns({"reward_model": length_reward}, None)
    with pytest.raises(TypeError, match="reward function 'x' is a int, not a callable"):
        resolve_reward_fns({"x": 3}, None)


def test_a_task_without_a_reward_model_and_no_functions_is_refused(make_env):
    from textenv import tasks

    original = tasks.TASKS["reviews"]

    def no_reward():
        task = original()
        return tasks.EmbeddedTask(task.name, task.policy_dir, None, task.rows)

    tasks.TASKS["reviews"] = no_reward
    try:
        with pytest.raises(ValueError, match="nothing pays a score"):
            make_env()
    finally:
        tasks.TASKS["reviews"] = original


def test_bool_returns_count_as_one_and_zero_and_torch_scalars_are_refused(make_env):
    env = make_env(reward_fns=[lambda **kw: True], prompts=ROWS, max_new_tokens=2)
    _, steps = run_episode(env)
    assert steps[-1][2]["score"] == 1.0
    env = make_env(reward_fns=[lambda **kw: torch.tensor(1.0)], prompts=ROWS, max_new_tokens=2)
    with pytest.raises(TypeError, match="a Tensor"):
        run_episode(env)


# --------------------------------------------------------------------------- float32 values
@pytest.mark.parametrize(
    ("value", "shown"), [(1e39, "1e\\+39"), (-1e39, "-1e\\+39"), (10**400, "an integer of about 10\\*\\*400")]
)
def test_a_reward_beyond_float32_is_refused_naming_the_function(value, shown):
    def huge(**kwargs):
        return value

    env = lockstep_vec(reward_fns=[huge])
    with pytest.raises(ValueError, match=rf"reward function 'huge' returned {shown} for .*within float32's range"):
        end_episodes(env)


@pytest.mark.parametrize(("weight", "shown"), [(1e39, "1e\\+39"), (10**400, "an integer of about 10\\*\\*400")])
def test_a_weight_beyond_float32_is_refused_at_construction(weight, shown):
    with pytest.raises(
        ValueError, match=rf"the weight of reward function 'zero' must be a finite number within float32's .*{shown}"
    ):
        lockstep_vec(reward_fns=[zero], reward_weights=[weight])


def test_a_weighted_value_or_sum_beyond_float32_is_refused():
    def big(**kwargs):
        return 3e38

    def also_big(**kwargs):
        return 3e38

    with pytest.raises(ValueError, match=r"reward function 'big' times its weight 10 is 3e\+39 for slot 0"):
        end_episodes(lockstep_vec(reward_fns=[big], reward_weights=[10.0]))
    with pytest.raises(ValueError, match=r"the weighted sum of the reward functions 'big', 'also_big' is 6e\+38"):
        end_episodes(lockstep_vec(reward_fns=[big, also_big]))


def test_the_largest_float32_reward_is_paid_as_itself():
    def largest(**kwargs):
        return 3e38

    _, rewards, _, _, info = end_episodes(lockstep_vec(reward_fns=[largest], kl_coef=0.0))
    assert np.isfinite(rewards).all() and rewards == pytest.approx(3e38, rel=1e-6)
    assert info["reward/largest"] == pytest.approx(3e38, rel=1e-6)


# --------------------------------------------------------------------------- edited rows
def test_a_reward_function_that_edits_its_row_changes_nothing_for_later_episodes():
    seen = []

    def greedy(row, **kwargs):
        seen.append(list(row["tags"]))
        row["tags"].append("mine")  # nested: a shallow copy would share this list
        row["new"] = 1
        return 0.0

    def other(row, **kwargs):
        seen.append(list(row["tags"]))
        return 0.0

    rows = [{"prompt": "The movie was", "tags": ["a"]}]
    env = lockstep_vec(reward_fns=[greedy, other], prompts=rows)
    for _ in range(3):
        end_episodes(env)
    assert seen == [["a"]] * 12
    assert env.unwrapped.rows[0] == {"tags": ["a"]}
    _, info = env.reset(seed=0)
    info["row"][0]["tags"].append("caller's")
    assert env.unwrapped.rows[0] == {"tags": ["a"]}
