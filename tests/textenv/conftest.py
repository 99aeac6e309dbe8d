"""Fixtures several textenv test files share: the default task's tokenizer, envs on the default task, a chat
tokenizer. The factories ``make_env`` and ``make_vec`` are tests/conftest.py's."""

import gymnasium as gym
import pytest
from transformers import AutoTokenizer

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from textenv.default_task import POLICY_DIR

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


@pytest.fixture(scope="module")
def vocab_size(tokenizer):
    return len(tokenizer)


@pytest.fixture(scope="module")
def env():
    """The default env, as a user gets it. Every test that uses it resets it first."""
    env = gym.make("TokenRLHF-v0")
    yield env
    env.close()


@pytest.fixture(scope="module")
def vec_env(make_vec):
    """Two slots of four new tokens, shared by the tests that leave it as they found it (they reset it first)."""
    env = make_vec(2, max_new_tokens=4)
    yield env
    env.close()


@pytest.fixture
def chat_tokenizer():
    """The default task's tokenizer with a plain chat template ("role: content" lines, then "assistant:")."""
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
