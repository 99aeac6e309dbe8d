"""stable-baselines3 on TokenRLHF-v0: a batched VecEnv, an LM actor-critic policy, and the KL term.

SB3's PPO and A2C run unchanged on ``gym.make("TokenRLHF-v0")`` with
``"MultiInputPolicy"`` (SB3 wraps the env in ``Monitor`` and ``DummyVecEnv``). This
module adds what it takes to fine-tune a language model with SB3's own PPO:

``TokenVecEnv``
    The batched ``TokenGenerationVectorEnv`` as an SB3 ``VecEnv``: N episodes per
    forward and one KV cache per frozen model, instead of N single envs stepped one
    by one. SB3 semantics: when a slot ends, ``step`` returns the first observation
    of its next episode, the final one in ``infos[i]["terminal_observation"]``, and
    ``infos[i]["TimeLimit.truncated"]`` for an episode cut off at ``max_new_tokens``
    (PPO then bootstraps it with the value of the final observation).

``LMActorCriticPolicy``
    An SB3 ``ActorCriticPolicy`` around a Hugging Face causal LM (default: the
    embedded task's SFT policy). The features extractor is the transformer: it reads
    the Dict observation (``input_ids``, ``attention_mask``, position ids from the
    mask) and returns the hidden state at the last position. The action net is the
    LM head divided by ``temperature``; the value net is a zero-initialised linear
    head on the same hidden state (the backbone is shared). SB3's Categorical
    distribution over the action net's logits is exactly
    ``log_softmax(lm_logits / temperature)``, and SB3's optimizer trains every LM
    weight. ``policy.lm`` is the (trained) LM; ``policy.save_pretrained(dir)`` writes
    it in Hugging Face format.

``SB3PolicyLogprobs``
    A callable to give the env as its ``policy=``: it returns the SB3 policy's
    log-probabilities for the observation batch, so the env's reward carries the true
    KL penalty. See "The KL term" below.

Limits of the LM policy (honestly: it is for teaching-scale models)
    - SB3 re-encodes the whole context at every step, in the rollout and in every
      epoch of the update: one full forward of ``L = max_prompt_tokens +
      max_new_tokens`` tokens per generated token, with no KV cache. The native
      agent (``python -m agents``) runs one cached forward per token and one
      teacher-forced forward per episode in the update. The cost of SB3's way grows
      with L (each step) and with model size; fine for the embedded 2-layer model,
      impractical for anything big.
    - Observations travel as flat int arrays of fixed length L; SB3's rollout buffer
      stores them as float32 (exact for token ids below 2**24) and the extractor
      casts them back.
    - No padding-free batching, no mixed precision, no gradient checkpointing, no
      LoRA, no adaptive KL controller: SB3's PPO knows none of them.
    - The action net is ``lm.get_output_embeddings()`` applied to the last hidden
      state of ``lm.base_model``. Models whose logits are post-processed beyond that
      (logit soft-capping, logit scaling) are rejected at construction, where a probe
      checks that both ways give the same logits.

The KL term: where ``log pi`` comes from
    The env's reward is ``-kl_coef * (log pi(a|s) - log pi_ref(a|s)) + score``, and the
    env needs ``log pi`` from somewhere (``info["kl_source"]`` says where it came from):

    1. ``"caller"``: ``logprobs=`` on the vector env's ``step``. SB3's rollout loop
       never passes it, so SB3 users use 2 or 3.
    2. ``"policy"``: a ``policy=`` given to the env. A torch module is stepped as a
       causal LM with its own KV cache (do *not* pass an SB3 policy object there);
       a callable gets the observation batch (numpy ``(N, L)`` arrays) and returns
       log-probs ``(N, vocab)``. ``SB3PolicyLogprobs`` is that callable for an SB3
       policy. The env is built before the SB3 model, so attach the policy after::

           kl = SB3PolicyLogprobs()
           env = TokenVecEnv(num_envs=16, policy=kl)
           model = PPO(LMActorCriticPolicy, env)
           kl.policy = model.policy

       Reward per step: ``-kl_coef * (log pi_sb3(a|s) - log pi_ref(a|s))``, plus the
       score on the last step. With ``LMActorCriticPolicy`` the log-probs are taken
       from the forward SB3 just ran to pick the actions (same observations, same
       weights), so source 2 costs no extra forward; other SB3 policies get one extra
       forward per step.
    3. ``"reference_only"``: neither. Reward per step: ``kl_coef * log pi_ref(a|s)``,
       plus the score on the last step. Since

           E_{a~pi}[log pi_ref(a|s)] + H(pi(.|s)) = -KL(pi(.|s) || pi_ref(.|s)),

       an entropy bonus of ``kl_coef * H(pi(.|s))`` at every visited state turns the
       expected per-step reward into the KL-regularised one, ``-kl_coef * KL``: run
       SB3 with ``ent_coef=kl_coef``, ``gamma=1`` and, for PPO,
       ``normalize_advantage=False`` (SB3's PPO whitens advantages per minibatch,
       which rescales the reward side of the loss but not the entropy term, so the
       two coefficients would no longer match; A2C does not whiten by default).
       Caveat: SB3's entropy bonus is a loss term at the visited states, not part of
       the return. It supplies the direct gradient of ``H`` at each state, but the
       returns still carry the ``-kl_coef * H`` part of every later step's expected
       reward, so earlier tokens are charged for the entropy of the states they lead
       to, which nothing pays back. That biases towards shorter, lower-entropy
       responses; source 2 has no such bias. Use source 3 only where the policy
       cannot be evaluated on the env's observations (every SB3 policy can).

    The env computes log-probs at its own ``temperature``; give the
    ``LMActorCriticPolicy`` the same temperature, or the KL compares different
    distributions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from safetensors.torch import save_file
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from textenv.default_task import POLICY_DIR
from textenv.models import position_ids_from_mask
from textenv.vector_env import TokenGenerationVectorEnv

VALUE_HEAD_FILE = "value_head.safetensors"
INFO_KEYS = ("ref_logprob", "logprob", "kl", "non_score_reward", "score")

__all__ = [
    "LMActorCriticPolicy",
    "LMFeaturesExtractor",
    "SB3PolicyLogprobs",
    "TokenVecEnv",
]


# --------------------------------------------------------------------------- the VecEnv adapter
class TokenVecEnv(VecEnv):
    """``TokenGenerationVectorEnv`` as a stable-baselines3 ``VecEnv`` (N slots, one batched step).

    Build it from env keyword arguments (``TokenVecEnv(num_envs=16, max_new_tokens=32,
    policy=...)``, anything ``gym.make("TokenRLHF-v0")`` takes), or wrap an existing
    batched env made with ``autoreset_mode="Disabled"``.

    Autoreset bridging. SB3 wants, from the ``step`` in which an episode ends, the
    *next* episode's first observation (the final one in
    ``infos[i]["terminal_observation"]``). Gymnasium's ``NEXT_STEP`` autoreset gives
    the final observation and restarts the slot on the following ``step``, which
    ignores that slot's action and pays 0: a step SB3 would store as a real
    transition. Nor can that reset step be run early for the ended slots alone: it
    advances every other slot with whatever action it is given. So the adapter runs
    the env in lockstep mode (``DISABLED``) and, after each step, restarts exactly the
    slots that ended with ``reset(options={"reset_mask": ended})``: their KV-cache
    rows are rebuilt on a new prompt while every other slot keeps its state. Each
    SB3 step is one real token for every slot, and no zero-reward filler steps reach
    SB3's buffer.

    ``infos[i]`` holds the env's per-step values for slot i (``ref_logprob``,
    ``logprob``, ``kl``, ``non_score_reward``, ``score``: None where unknown),
    ``kl_source``, and on the last step ``response``, ``terminal_observation`` and
    ``TimeLimit.truncated``. ``reset_infos[i]`` holds ``prompt`` and ``prompt_index``
    of slot i's current episode (updated when it restarts).

    All slots share one env, so ``set_attr`` applies to all of them (a subset raises)
    and ``env_method`` calls the method once. For SB3's episode statistics
    (``rollout/ep_rew_mean``) wrap it in ``stable_baselines3.common.vec_env.VecMonitor``.
    """

    def __init__(self, env: gym.vector.VectorEnv | None = None, *, num_envs: int = 8, **env_kwargs: Any):
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
            slot: dict[str, Any] = {"kl_source": info["kl_source"][i]}
            for key in INFO_KEYS:
                value = float(info[key][i])
                slot[key] = None if np.isnan(value) else value
            if dones[i]:
                slot["response"] = info["response"][i]
                slot["terminal_observation"] = {key: value[i].copy() for key, value in observation.items()}
                slot["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            infos.append(slot)
        if dones.any():
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


# --------------------------------------------------------------------------- the LM policy
def _load_lm(lm: str | os.PathLike | nn.Module | None) -> nn.Module:
    if lm is None:
        lm = POLICY_DIR
    if not isinstance(lm, nn.Module):
        lm = AutoModelForCausalLM.from_pretrained(lm)
    return lm


def _check_lm_head(lm: nn.Module) -> None:
    """Raise if ``head(base_model(x).last_hidden_state)`` differs from the LM's own logits on a probe."""
    device = next(lm.parameters()).device
    ids = torch.tensor([[3, 4, 5, 6]], device=device) % lm.get_output_embeddings().out_features
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        ours = lm.get_output_embeddings()(hidden.last_hidden_state).float()
        theirs = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ValueError(
            f"{type(lm).__name__}'s logits are not its output embedding applied to its base model's last hidden "
            "state (soft-capping or scaling of logits?); LMActorCriticPolicy cannot split it into features "
            "extractor and action net"
        )


class LMFeaturesExtractor(BaseFeaturesExtractor):
    """The transformer of a causal LM on TokenRLHF-v0's Dict observation: the last position's hidden state.

    Observations arrive as float tensors (SB3 preprocesses Box spaces with ``.float()``)
    and are cast back to token ids. The context is left-padded, so the last position is
    always the newest real token; position ids come from the attention mask, as in the env.
    """

    def __init__(self, observation_space: spaces.Dict, lm: str | os.PathLike | nn.Module | None = None):
        if not isinstance(observation_space, spaces.Dict) or set(observation_space.spaces) != {
            "input_ids",
            "attention_mask",
        }:
            raise ValueError(f"expected TokenRLHF-v0's Dict(input_ids, attention_mask) space, got {observation_space}")
        lm = _load_lm(lm)
        super().__init__(observation_space, features_dim=lm.get_output_embeddings().in_features)
        self.lm = lm

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        ids = observations["input_ids"].long()
        mask = observations["attention_mask"].long()
        # drop the leading columns that are padding in every row: same result, less work
        first = int(mask.any(0).long().argmax()) if mask.any() else 0
        ids, mask = ids[:, first:], mask[:, first:]
        out = self.lm.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        return out.last_hidden_state[:, -1]


class TemperatureHead(nn.Module):
    """The LM head as SB3's action net: ``logits / temperature`` (float32)."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head = head
        self.temperature = temperature

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden).float() / self.temperature


class LMActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic whose actor is a Hugging Face causal LM (see the module docstring).

    Use it as ``PPO(LMActorCriticPolicy, env, policy_kwargs={"lm": ..., "temperature": ...})``.

    :param lm: a causal LM, or a directory / hub name ``from_pretrained`` loads
        (default: the embedded task's SFT policy). A module is trained in place.
    :param temperature: the action distribution is ``softmax(lm_logits / temperature)``;
        use the env's temperature.
    :param kwargs: the rest of ``ActorCriticPolicy``'s arguments (optimizer, ...).
        ``net_arch``, ``ortho_init``, ``features_extractor_*`` and
        ``share_features_extractor`` are fixed: no MLP between the transformer and
        the heads, no re-initialisation of the LM, one shared backbone.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Callable[[float], float],
        lm: str | os.PathLike | nn.Module | None = None,
        temperature: float = 1.0,
        **kwargs: Any,
    ):
        fixed = ("net_arch", "ortho_init", "features_extractor_class", "features_extractor_kwargs")
        given = [key for key in (*fixed, "share_features_extractor") if key in kwargs]
        if given:
            raise ValueError(f"LMActorCriticPolicy fixes {given}; pass lm= and temperature= instead")
        if kwargs.pop("use_sde", False):
            raise ValueError("use_sde does not apply to a Discrete (token) action space")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"the action space must be Discrete(vocab_size), got {action_space}")
        lm = _load_lm(lm)
        vocab = lm.get_output_embeddings().out_features
        if int(action_space.n) != vocab:
            raise ValueError(f"the LM predicts {vocab} tokens but the action space is {action_space}")
        _check_lm_head(lm)
        for module in lm.modules():  # rollout and update forwards must agree (first PPO ratio exactly 1)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.temperature = float(temperature)
        self._rollout_logprobs: tuple[np.ndarray, np.ndarray, Tensor] | None = None
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[],
            ortho_init=False,
            features_extractor_class=LMFeaturesExtractor,
            features_extractor_kwargs={"lm": lm},
            share_features_extractor=True,
            **kwargs,
        )

    @property
    def lm(self) -> PreTrainedModel:
        """The causal LM that SB3 trains (its weights are the policy's)."""
        return self.features_extractor.lm

    def _build(self, lr_schedule: Callable[[float], float]) -> None:
        self._build_mlp_extractor()  # net_arch=[]: the identity
        self.action_net = TemperatureHead(self.features_extractor.lm.get_output_embeddings(), self.temperature)
        self.value_net = nn.Linear(self.features_dim, 1)
        nn.init.zeros_(self.value_net.weight)  # V = 0 at the start: no noisy advantages from a random head
        nn.init.zeros_(self.value_net.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for key in ("net_arch", "ortho_init", "features_extractor_class", "features_extractor_kwargs", "use_sde"):
            data.pop(key, None)
        for key in ("squash_output", "full_std", "use_expln", "log_std_init"):
            data.pop(key, None)
        data.update(lm=self.lm, temperature=self.temperature)
        return data

    def set_temperature(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = self.action_net.temperature = float(temperature)

    def forward(self, obs: dict[str, Tensor], deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """SB3's rollout forward; also keeps the log-prob table for ``SB3PolicyLogprobs`` (no second forward)."""
        features = self.extract_features(obs)
        latent_pi, latent_vf = self.mlp_extractor(features)
        values = self.value_net(latent_vf)
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        if not torch.is_grad_enabled():
            self._rollout_logprobs = (
                obs["input_ids"].detach().cpu().numpy().astype(np.int64),
                obs["attention_mask"].detach().cpu().numpy().astype(np.int64),
                distribution.distribution.logits.detach(),
            )
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def set_training_mode(self, mode: bool) -> None:
        if mode:
            self._rollout_logprobs = None  # the weights are about to change
        super().set_training_mode(mode)

    @torch.no_grad()
    def logprob_table(self, observation: dict[str, np.ndarray]) -> Tensor:
        """Log-probs (N, vocab) of the next token for a batch of env observations (numpy (N, L) arrays).

        Reuses the table of the latest rollout forward when it ran on exactly these observations.
        """
        cached, self._rollout_logprobs = self._rollout_logprobs, None
        if cached is not None:
            ids, mask, table = cached
            if np.array_equal(ids, observation["input_ids"]) and np.array_equal(mask, observation["attention_mask"]):
                return table
        return _distribution_logprobs(self, observation)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The LM in Hugging Face format (``AutoModelForCausalLM.from_pretrained`` loads it), value head beside it."""
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        state = {f"value_net.{k}": v.detach().cpu().contiguous() for k, v in self.value_net.state_dict().items()}
        save_file(state, directory / VALUE_HEAD_FILE)


# --------------------------------------------------------------------------- KL source 2
@torch.no_grad()
def _distribution_logprobs(policy: ActorCriticPolicy, observation: dict[str, np.ndarray]) -> Tensor:
    obs, _ = policy.obs_to_tensor(observation)
    distribution = policy.get_distribution(obs).distribution
    if not isinstance(distribution, torch.distributions.Categorical):
        raise TypeError(f"expected a Categorical action distribution (Discrete actions), got {type(distribution)}")
    return distribution.logits  # torch normalises Categorical logits: these are log-probabilities


class SB3PolicyLogprobs:
    """The env's ``policy=`` callable for an SB3 policy: observation batch -> log-probs (N, vocab).

    The env is made before the SB3 model, so set the policy afterwards::

        kl = SB3PolicyLogprobs()
        env = TokenVecEnv(num_envs=16, policy=kl)   # or gym.make("TokenRLHF-v0", policy=kl)
        model = PPO(LMActorCriticPolicy, env)
        kl.policy = model.policy

    Any SB3 policy with a Categorical action distribution works (one extra forward per
    step); ``LMActorCriticPolicy`` hands over the table of the forward that chose the
    actions. Deliberately not a ``torch.nn.Module``: the env would take a module for a
    causal LM to step with a KV cache.
    """

    def __init__(self, policy: ActorCriticPolicy | None = None):
        self.policy = policy

    def __call__(self, observation: dict[str, np.ndarray]) -> Tensor:
        if self.policy is None:
            raise RuntimeError(
                "SB3PolicyLogprobs has no policy yet: after making the SB3 model, set kl.policy = model.policy"
            )
        if hasattr(self.policy, "logprob_table"):
            return self.policy.logprob_table(observation)
        return _distribution_logprobs(self.policy, observation)
