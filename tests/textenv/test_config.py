"""TokenEnvConfig and resolve_config: each task's preset reaches the env, a setting given wins, resolving is done once.

The envs, the trainer and ``python -m agents.evaluate`` all run on ``resolve_config``'s result; the tests here
check the function and that the envs hold what it returns. The envs' typed keyword arguments (``TokenEnvSettings``)
are the config's fields. Settings out of range or of the wrong type (non-finite numbers, unknown keywords,
``config=`` with keywords) are refused where they enter: gym.make, gym.make_vec and TokenEnvConfig.
"""

import ast
import inspect
import re
import typing
from dataclasses import fields, replace
from pathlib import Path

import gymnasium as gym
import pytest

from textenv import TokenEnvConfig, TokenGenerationEnv, TokenGenerationVectorEnv
from textenv.calculator import MAX_ENV_TOKENS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_TURNS, Calculator
from textenv.config import TokenEnvSettings, resolve_config
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.tasks import LIMITS, TASKS, EpisodeLimits, get_task

ENV_ID = "TokenRLHF-v0"


def limits_of(config: TokenEnvConfig) -> dict[str, int]:
    return {name: getattr(config, name) for name in LIMITS}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_unset_limits_are_the_tasks_and_resolving_twice_changes_nothing(task):
    config = TokenEnvConfig(task=task)
    assert all(value is None for value in limits_of(config).values())  # unset until resolved
    resolved = resolve_config(config)
    assert limits_of(resolved) == {name: getattr(get_task(task).limits, name) for name in LIMITS}
    assert resolve_config(resolved) == resolved
    assert config.max_new_tokens is None  # the caller's config is left as it was


def test_the_calculator_preset_carries_its_own_limits():
    resolved = resolve_config(TokenEnvConfig(task="calculator"))
    assert limits_of(resolved) == {
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_turns": MAX_TURNS,
        "max_env_tokens": MAX_ENV_TOKENS,
    }
    assert resolved.interaction is Calculator and resolved.accuracy_term == "final_answer"
    assert resolved.window(turns=True) == 8 + 3 * 6 + 2 * 6


def test_the_review_preset_is_the_base_defaults():
    assert get_task("reviews").limits == EpisodeLimits()
    assert limits_of(resolve_config(TokenEnvConfig())) == {
        "max_prompt_tokens": 16,
        "max_new_tokens": 32,
        "max_turns": 4,
        "max_env_tokens": 16,
    }


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_setting_given_wins_over_the_preset(task):
    resolved = resolve_config(TokenEnvConfig(task=task, max_new_tokens=9, max_turns=2))
    preset = get_task(task).limits
    assert (resolved.max_new_tokens, resolved.max_turns) == (9, 2)
    assert (resolved.max_prompt_tokens, resolved.max_env_tokens) == (preset.max_prompt_tokens, preset.max_env_tokens)


def test_the_reward_model_falls_back_to_the_tasks_only_without_reward_functions():
    def short(response_ids, **kwargs):
        return float(len(response_ids) < 4)

    assert resolve_config(TokenEnvConfig()).reward_model == REWARD_MODEL_DIR
    assert resolve_config(TokenEnvConfig(reward_fns=[short])).reward_model is None
    both = resolve_config(TokenEnvConfig(reward_fns=[short], reward_model="my/rm"))
    assert both.reward_model == "my/rm" and list(both.reward_fns) == [short]
    assert resolve_config(TokenEnvConfig(task="arithmetic")).reward_model is None


def test_the_tasks_answer_check_counts_only_when_its_own_reward_functions_pay():
    def check(response, row, **kwargs):
        return float(response.strip() == row["answer"])

    assert resolve_config(TokenEnvConfig(task="arithmetic")).accuracy_term == "exact_match"
    assert resolve_config(TokenEnvConfig(task="arithmetic", reward_fns=[check])).accuracy_term is None
    named = TokenEnvConfig(task="arithmetic", reward_fns=[check], accuracy_term="check")
    assert resolve_config(named).accuracy_term == "check"
    assert resolve_config(TokenEnvConfig()).accuracy_term is None
    with pytest.raises(TypeError, match="accuracy_term must be a reward function's name"):
        TokenEnvConfig(accuracy_term=3)


def test_an_accuracy_term_that_names_no_reward_function_is_refused():
    with pytest.raises(ValueError, match=r"accuracy_term 'exact' names no reward function.*\['exact_match'\]"):
        gym.make(ENV_ID, task="arithmetic", accuracy_term="exact", device="cpu")


def test_the_reference_model_is_the_tasks_policy_unless_given():
    assert resolve_config(TokenEnvConfig()).reference_model == POLICY_DIR
    assert resolve_config(TokenEnvConfig(task="arithmetic")).reference_model == get_task("arithmetic").policy_dir
    assert resolve_config(TokenEnvConfig(reference_model="my/policy")).reference_model == "my/policy"


@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
def test_the_env_runs_the_calculator_tasks_window(vector):
    if vector:
        env = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", task="calculator", device="cpu")
        space = env.single_observation_space
    else:
        env = gym.make(ENV_ID, task="calculator", device="cpu")
        space = env.observation_space
    window = MAX_PROMPT_TOKENS + MAX_TURNS * MAX_NEW_TOKENS + (MAX_TURNS - 1) * MAX_ENV_TOKENS
    assert {key: box.shape for key, box in space.spaces.items()} == {
        key: (window,) for key in ("input_ids", "attention_mask", "agent_mask")
    }
    assert limits_of(env.unwrapped.config) == limits_of(resolve_config(TokenEnvConfig(task="calculator")))
    observation, _ = env.reset(seed=0)
    assert observation["input_ids"].shape[-1] == window
    env.close()


def test_the_window_of_an_unresolved_config_is_an_error_that_says_so():
    with pytest.raises(ValueError, match="resolve_config"):
        TokenEnvConfig().window(turns=False)


def field_docstrings(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls.__name__).body
    found = {}
    for statement, following in zip(body, body[1:]):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr):
            found[statement.target.id] = " ".join(following.value.value.split())
    return found


@pytest.mark.parametrize("name", LIMITS)
def test_each_limits_docstring_states_every_tasks_value(name):
    docstring = field_docstrings(TokenEnvConfig)[name]
    for task in TASKS:
        assert f"{task} {getattr(get_task(task).limits, name)}" in docstring, (name, task, docstring)


def test_the_envs_keyword_arguments_are_the_configs_fields_typed():
    config_fields = [f.name for f in fields(TokenEnvConfig)]
    assert list(typing.get_type_hints(TokenEnvSettings)) == config_fields
    for cls in (TokenGenerationEnv, TokenGenerationVectorEnv):
        parameters = inspect.signature(cls.__init__).parameters.values()
        keywords = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
        assert [p.annotation for p in keywords] == ["Unpack[TokenEnvSettings]"], cls
        hints = typing.get_type_hints(cls.__init__)  # the annotations resolve at run time too
        assert "settings" in hints


@pytest.mark.parametrize("entry", ["make", "make_vec"])
def test_keyword_arguments_build_the_same_config_as_config(entry):
    if entry == "make":
        by_keywords = gym.make(ENV_ID, max_new_tokens=8, device="cpu")
        by_config = gym.make(ENV_ID, config=TokenEnvConfig(max_new_tokens=8, device="cpu"))
    else:
        make = dict(num_envs=2, vectorization_mode="vector_entry_point")
        by_keywords = gym.make_vec(ENV_ID, **make, max_new_tokens=8, device="cpu")
        by_config = gym.make_vec(ENV_ID, **make, config=TokenEnvConfig(max_new_tokens=8, device="cpu"))
    assert by_keywords.unwrapped.config == by_config.unwrapped.config
    assert by_keywords.unwrapped.config == resolve_config(TokenEnvConfig(max_new_tokens=8, device="cpu"))
    assert by_keywords.unwrapped.config.score_clip == 5.0


def test_score_clip_has_one_default_for_env_training_and_evaluation():
    from agents.evaluate import EvalConfig
    from agents.train import TrainConfig

    assert TokenEnvConfig().score_clip == 5.0
    assert TrainConfig().env == TokenEnvConfig()
    assert replace(EvalConfig().env, split="train") == TokenEnvConfig()


def test_the_limits_values_live_in_the_presets_not_in_the_configs_defaults():
    defaults = {f.name: f.default for f in fields(TokenEnvConfig)}
    assert all(defaults[name] is None for name in LIMITS)


# --------------------------------------------------------------------------- settings refused
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
FLOAT_FIELDS = ["kl_coef", "score_clip", "missing_eos_penalty", "temperature"]


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
