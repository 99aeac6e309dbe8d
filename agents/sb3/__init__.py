"""stable-baselines3 on TokenRLHF-v0: fine-tune a language model with SB3's own PPO.

SB3's PPO and A2C already run unchanged on ``gym.make("TokenRLHF-v0")`` with
``"MultiInputPolicy"``. This package adds what it takes to train an LM with them:

- ``TokenVecEnv`` (``vec_env.py``): the batched env as an SB3 ``VecEnv``;
- ``LMActorCriticPolicy`` and ``LMFeaturesExtractor`` (``policy.py``): a causal LM
  as SB3's actor-critic;
- ``SB3PolicyLogprobs`` (``policy.py``): the SB3 policy's log-probs for the env's KL term.

How they fit together, their limits and where the env's ``log pi`` comes from: docs/sb3.md.
"""

from agents.sb3.policy import LMActorCriticPolicy, LMFeaturesExtractor, SB3PolicyLogprobs
from agents.sb3.vec_env import TokenVecEnv

__all__ = ["LMActorCriticPolicy", "LMFeaturesExtractor", "SB3PolicyLogprobs", "TokenVecEnv"]
