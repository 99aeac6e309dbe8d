"""``TokenVecEnv``: the batched TokenRLHF-v0 env as a stable-baselines3 ``VecEnv``.

N episodes per forward and one KV cache per frozen model, instead of N single envs
stepped one by one through ``DummyVecEnv``. Why the adapter runs the env in lockstep
mode and restarts ended slots itself: docs/sb3.md, "Autoreset".
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from textenv.config import TokenEnvSettings
from textenv.info import slot_info
from textenv.vector_env import TokenGenerationVectorEnv

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # a dependency of torch
    from typing_extensions import Unpack

__all__ = ["TokenVecEnv"]


class TokenVecEnv(VecEnv):
    """``TokenGenerationVectorEnv`` as a stable-baselines3 ``VecEnv`` (N slots, one batched step).

    Build it from env keyword arguments (``TokenVecEnv(num_envs=16, max_new_tokens=32,
    policy=...)``, anything ``gym.make("TokenRLHF-v0")`` takes), or wrap an existing
    batched env made with ``autoreset_mode="Disabled"``.

    SB3 semantics: when a slot ends, ``step`` returns the first observation of its next
    episode, the final one in ``infos[i]["terminal_observation"]``, and
    ``infos[i]["TimeLimit.truncated"]`` for an episode cut off at ``max_new_tokens``
    (PPO then bootstraps it with the value of the final observation). Each SB3 step is
    one real token for every slot: no zero-reward filler steps reach SB3's buffer.

    ``infos[i]`` is what the single env reports for slot i (``ref_logprob``,
    ``logprob``, ``kl``, ``non_score_reward``, ``score``: None where unknown;
    ``kl_source``; on the last step ``response``), plus the two SB3 keys above.
    ``reset_infos[i]`` holds ``prompt`` and ``prompt_index`` of slot i's current
    episode (updated when it restarts).

    All slots share one env, so ``set_attr`` applies to all of them (a subset raises)
    and ``env_method`` calls the method once. For SB3's episode statistics
    (``rollout/ep_rew_mean``) wrap it in ``stable_baselines3.common.vec_env.VecMonitor``.
    """

    def __init__(
        self, env: gym.vector.VectorEnv | None = None, *, num_envs: int = 8, **env_kwargs: Unpack[TokenEnvSettings]
    ):
        if env is None:
            env = TokenGenerationVectorEnv(num_envs=num_envs, autoreset_mode=AutoresetMode.DISABLED, **env_kwargs)
        else:
            if env_kwargs:
                raise ValueError(f"pass either an env or env keyword arguments, not both (got {sorted(env_kwargs)})")
            if not isinstance(env.unwrapped, TokenGenerationVectorEnv):
                raise TypeError(f"TokenVecEnv wraps a TokenGenerationVectorEnv, got {type(env.unwrapped).__name__}")
            if env.unwrapped.autoreset_mode != AutoresetMode.DISABLED:
                raise ValueError(
                    "TokenVecEnv needs the batched env in lockstep mode: make it with autoreset_mode='Disabled' "
                    "(the adapter restarts ended slots itself, SB3-style; with NEXT_STEP each restart would cost "
                    "a zero-reward step that SB3 stores as a transition), or pass env keyword arguments instead"
                )
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self.render_mode = env.render_mode
        self.spec = getattr(env, "spec", None)
        self._actions: np.ndarray | None = None
        self._started = False

    # ---------------------------------------------------------------- reset and step
    def reset(self) -> VecEnvObs:
        seed = self._seeds[0]  # the N slots draw prompts from one RNG: the first seed seeds it
        observation, info = self.env.reset(seed=seed, options=self._combined_options())
        self._reset_seeds()
        self._reset_options()
        self._store_reset_infos(info, np.ones(self.num_envs, dtype=bool))
        self._started = True
        return observation

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        if not self._started:
            raise RuntimeError("step() called before reset(); call reset() first")
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        actions, self._actions = self._actions, None
        if np.issubdtype(actions.dtype, np.floating) and np.array_equal(actions, np.round(actions)):
            actions = actions.astype(np.int64)  # whole-number floats (numpy arithmetic) are token ids too
        observation, rewards, terminated, truncated, info = self.env.step(actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = []
        for i in range(self.num_envs):
            slot = slot_info(info, terminated, truncated, i)  # the single env's info, key for key
            if dones[i]:
                slot["terminal_observation"] = {key: value[i].copy() for key, value in observation.items()}
                slot["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            infos.append(slot)
        if dones.any():  # restart exactly the ended slots; the others keep their state and KV-cache rows
            observation, reset_info = self.env.reset(options={"reset_mask": dones})
            self._store_reset_infos(reset_info, dones)
        return observation, rewards.astype(np.float32), dones, infos

    def _store_reset_infos(self, info: dict, rows: np.ndarray) -> None:
        for i in np.flatnonzero(rows):
            self.reset_infos[i] = {"prompt": info["prompt"][i], "prompt_index": int(info["prompt_index"][i])}

    def _combined_options(self) -> dict | None:
        """SB3 keeps one options dict per env (``set_options``); the batched env takes one for all slots."""
        options = self._options
        if all(not o for o in options):
            return None
        if all(o == options[0] for o in options) and "prompt_index" not in options[0]:
            return dict(options[0])
        if all(set(o) == {"prompt_index"} for o in options):
            return {"prompt_index": [int(o["prompt_index"]) for o in options]}
        raise ValueError(
            f"per-env reset options must be equal for all envs, or each a {{'prompt_index': i}}; got {options}"
        )

    def close(self) -> None:
        self.env.close()

    # ---------------------------------------------------------------- the shared env's attributes
    @property
    def kl_coef(self) -> float:
        return self.env.unwrapped.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        self.env.unwrapped.kl_coef = value

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The attribute of the shared env, once per requested slot."""
        value = getattr(self.env, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the shared env; ``indices`` must name every slot (they share one env)."""
        if sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise ValueError(
                f"the {self.num_envs} slots of TokenVecEnv share one env, so {attr_name!r} can only be set for all "
                "of them (indices=None)"
            )
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Call a method of the shared env once; its result is repeated for every requested slot."""
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """No slot is a ``gym.Env`` that could carry a ``gym.Wrapper`` (use VecEnv wrappers such as VecMonitor)."""
        return [False for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        raise NotImplementedError("TokenRLHF-v0 renders text, not images: make it with render_mode='ansi'")

    def render(self, mode: str | None = None):
        """The decoded context of every slot (``render_mode="ansi"``), or printed (``"human"``)."""
        if mode is not None and mode != self.render_mode:
            warnings.warn(
                f"render mode is fixed when the env is made ({self.render_mode!r}); ignoring {mode!r}", stacklevel=2
            )
        return self.env.render()
