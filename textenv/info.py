"""What the envs report in ``info``: the keys, and one slot's view of the vector env's arrays.

This module is public: learners (``agents/``, the SB3 adapter, your own code) read
the env's ``info`` through it, never through the core.

- Every step: ``ref_logprob``, ``logprob``, ``kl`` (None / NaN where unknown),
  ``non_score_reward``, ``kl_source``, ``score`` (the episode's score on its last
  step); ``reward/<name>`` for each paying term (``REWARD_PREFIX``), its raw value
  on the last step; ``step_reward`` with a step reward function.
- The last step: ``response``, the decoded response.
- Episodes of several turns: ``turn_reward`` and ``env_tokens`` on the step that
  ended a turn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

REWARD_PREFIX = "reward/"  # info["reward/<name>"]: each paying term's raw value (the reward model, each function)
INFO_FLOATS = ("ref_logprob", "logprob", "kl", "non_score_reward", "score")


def slot_info(infos: dict[str, np.ndarray], terminated: np.ndarray, truncated: np.ndarray, slot: int) -> dict[str, Any]:
    """Slot ``slot``'s info as the single env reports it, from the vector env's info arrays: floats (None where
    unknown), the KL source, and on its last step the decoded response."""
    info: dict[str, Any] = {"kl_source": infos["kl_source"][slot]}
    floats = [key for key in infos if key in INFO_FLOATS or key.startswith(REWARD_PREFIX)]
    for key in floats + (["step_reward"] if "step_reward" in infos else []):
        value = float(infos[key][slot])
        info[key] = None if np.isnan(value) else value
    if terminated[slot] or truncated[slot]:
        info["response"] = infos["response"][slot]
    if "env_tokens" in infos:
        value = float(infos["turn_reward"][slot])
        info["turn_reward"] = None if np.isnan(value) else value
        info["env_tokens"] = list(infos["env_tokens"][slot])
    return info
