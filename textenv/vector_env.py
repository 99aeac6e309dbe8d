"""The batched TokenRLHF-v0: ``gym.make_vec("TokenRLHF-v0", num_envs=N, vectorization_mode="vector_entry_point")``.

N episodes share one forward pass per token and one KV cache per model. Two
autoreset modes (Gymnasium's ``AutoresetMode``):

- ``NEXT_STEP`` (default, what Gymnasium and SB3 users expect): a slot that ended
  starts its next prompt on the following ``step``, whose action it ignores
  (reward 0, not terminated, not truncated), while the other slots go on.
- ``DISABLED`` (lockstep, what a PPO rollout is): ``reset()`` starts every slot;
  ended slots ignore their actions and earn 0 until ``reset`` is called again,
  for all slots or for those in ``options={"reset_mask": mask}``.

The fast path: ``step(actions, logprobs=lp)`` with ``lp`` (N,) the acting
policy's log-probs of the chosen tokens (at the env's temperature). The env then
needs no policy forward of its own for the KL term.
"""

from __future__ import annotations

import copy
import numbers
import sys
from collections.abc import Mapping

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from textenv.config import TokenEnvConfig, TokenEnvSettings
from textenv.env import CoreView, check_render_mode, check_reset_options, make_core, observation_space
from textenv.info import REWARD_PREFIX

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # a dependency of torch
    from typing_extensions import Unpack


class TokenGenerationVectorEnv(CoreView, VectorEnv):
    """N token-generation episodes stepped as one batch (see the module docstring and ``TokenGenerationEnv``).

    Arguments: ``num_envs``, ``autoreset_mode``, ``render_mode``, and ``config`` or its fields as keyword arguments,
    as for ``TokenGenerationEnv``.
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        config: TokenEnvConfig | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
        **settings: Unpack[TokenEnvSettings],
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral):
            raise TypeError(f"num_envs must be an int, got {num_envs!r} of type {type(num_envs).__name__}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        autoreset_mode = AutoresetMode(autoreset_mode)
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or DISABLED, got {autoreset_mode}")
        check_render_mode(render_mode, self.metadata)
        self.metadata = {**self.metadata, "autoreset_mode": autoreset_mode}
        self.render_mode = render_mode
        self.num_envs = int(num_envs)
        self.core = make_core(TokenEnvConfig.from_kwargs(config, settings), self.num_envs)
        self.single_observation_space = observation_space(self.core)
        self.single_action_space = spaces.Discrete(self.core.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._started = False

    @property
    def autoreset_mode(self) -> AutoresetMode:
        return self.metadata["autoreset_mode"]

    def _draw_prompts(self, count: int) -> np.ndarray:
        return self.np_random.integers(len(self.core.prompts), size=count)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start every slot (or those in ``options["reset_mask"]``, lockstep mode only) on a new prompt.

        Options:
            prompt_index: an int or one index per reset slot, instead of drawn prompts.
            group_size: k; the reset slots form consecutive groups of k that share one drawn
                prompt (k episodes per prompt, as RLOO and GRPO need). k must divide their number.
        """
        super().reset(seed=seed)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict (or None), got {options!r} of type {type(options).__name__}")
        options = dict(options or {})
        rows = np.arange(self.num_envs)
        if options.get("reset_mask") is not None:
            mask = np.asarray(options["reset_mask"], dtype=bool)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
            if self.autoreset_mode != AutoresetMode.DISABLED and not mask.all():
                raise ValueError("reset_mask needs autoreset_mode=DISABLED; NEXT_STEP resets ended slots by itself")
            if not self._started and not mask.all():
                raise ValueError("the first reset must start every slot (reset_mask all True or absent)")
            rows = np.flatnonzero(mask)
        known = ("prompt_index", "reset_mask", "group_size")
        options = check_reset_options(options, len(self.core.prompts), known, len(rows))
        index = options.get("prompt_index")
        group = options.get("group_size")
        if group is not None:
            if index is not None:
                raise ValueError("pass either prompt_index or group_size, not both")
            if not isinstance(group, int | np.integer) or group < 1 or len(rows) % group:
                raise ValueError(
                    f"group_size must be a positive int dividing the {len(rows)} reset slots, got {group!r}"
                )
            index = np.repeat(self._draw_prompts(len(rows) // group), group)
        elif index is None:
            index = self._draw_prompts(len(rows))
        if len(rows):
            self.core.reset(rows, index)
        self._started = True
        self._autoreset[rows] = False
        info = {"prompt": np.array([self.core.prompt_text(r) for r in range(self.num_envs)], dtype=object)}
        info["prompt_index"] = self.core.prompt_index.copy()
        info["row"] = np.array([copy.deepcopy(self.core.rows[i]) for i in self.core.prompt_index], dtype=object)
        if self.render_mode == "human":
            self.render()
        return self.core.observation(), info

    def step(self, actions, logprobs=None):
        """Step every slot; ``logprobs`` (N,) are the acting policy's log-probs of ``actions`` (optional)."""
        if not self._started:
            raise RuntimeError("step() called before reset(); call reset() first")
        actions = self.core.check_actions(actions)  # before any slot restarts: a bad call changes nothing
        if logprobs is not None:
            self.core.check_logprobs(logprobs)
        active = None
        restarting = self._autoreset.copy()
        if restarting.any():
            rows = np.flatnonzero(restarting)
            self.core.reset(rows, self._draw_prompts(len(rows)))
            active = ~restarting
        result = self.core.step(actions, logprobs=logprobs, active=active)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset = result.terminated | result.truncated
        infos = dict(result.infos)
        for key in [key for key in infos if key in ("score", "turn_reward") or key.startswith(REWARD_PREFIX)]:
            infos["_" + key] = ~np.isnan(infos[key])
        if "env_tokens" in infos:
            infos["_env_tokens"] = np.array([len(tokens) > 0 for tokens in infos["env_tokens"]])
        infos["_response"] = result.terminated | result.truncated
        if restarting.any():
            infos["prompt"] = np.array(
                [self.core.prompt_text(r) if restarting[r] else None for r in range(self.num_envs)], dtype=object
            )
            infos["row"] = np.array(
                [
                    copy.deepcopy(self.core.rows[self.core.prompt_index[r]]) if restarting[r] else None
                    for r in range(self.num_envs)
                ],
                dtype=object,
            )
            infos["_prompt"] = infos["_row"] = restarting
        if self.render_mode == "human":
            self.render()
        return self.core.observation(), result.rewards, result.terminated, result.truncated, infos

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode is None:
            gym.logger.warn("render() needs a render_mode: make the env with render_mode='ansi' or 'human'")
            return None
        texts = tuple(self.core.render_row(r) for r in range(self.num_envs))
        if self.render_mode == "human":
            print("\n".join(texts))
            return None
        return texts
