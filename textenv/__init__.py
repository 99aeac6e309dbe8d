"""textenv: RLHF with PPO as plain reinforcement learning.

``gym.make("TokenRLHF-v0")`` is one token-generation episode at a time;
``gym.make_vec("TokenRLHF-v0", num_envs=N, vectorization_mode="vector_entry_point")``
steps N of them as one batch. With no arguments both use the embedded default task;
every setting is a field of ``TokenEnvConfig`` (pass ``config=`` or its fields).
"""

import gymnasium as gym

from textenv.config import TokenEnvConfig
from textenv.env import TokenGenerationEnv
from textenv.vector_env import TokenGenerationVectorEnv

gym.register(
    id="TokenRLHF-v0",
    entry_point="textenv.env:TokenGenerationEnv",
    vector_entry_point="textenv.vector_env:TokenGenerationVectorEnv",
    # gym.make returns the env itself, so the documented ``env.kl_coef = beta`` reaches it (on a Gymnasium
    # wrapper it would set an attribute of the wrapper and change nothing). The env enforces reset-before-step
    # itself, and the env checkers pass on it in the tests.
    order_enforce=False,
    disable_env_checker=True,
)

__all__ = ["TokenEnvConfig", "TokenGenerationEnv", "TokenGenerationVectorEnv"]
