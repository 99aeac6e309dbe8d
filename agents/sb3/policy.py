"""A Hugging Face causal LM as a stable-baselines3 actor-critic, and its log-probs for the env's KL term.

``LMActorCriticPolicy`` splits the LM into SB3's parts: the transformer is the
features extractor, the LM head (divided by ``temperature``) the action net, and a
zero-initialised linear head on the same hidden state the value net. SB3's
Categorical distribution over the action net's logits is then exactly
``log_softmax(lm_logits / temperature)``, and SB3's optimizer trains every LM weight.

``SB3PolicyLogprobs`` is the callable to give the env as its ``policy=`` (KL source 2),
so that the env's reward carries ``-kl_coef * (log pi - log pi_ref)``. Limits of the LM
policy and the three KL sources: docs/sb3.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from agents.policy import disable_dropout, save_value_head, value_head
from textenv.default_task import POLICY_DIR
from textenv.lm import crop_left_padding, position_ids_from_mask

__all__ = ["LMActorCriticPolicy", "LMFeaturesExtractor", "SB3PolicyLogprobs", "TemperatureHead"]


def _load_lm(lm: str | os.PathLike | nn.Module | None) -> nn.Module:
    if lm is None:
        lm = POLICY_DIR
    if not isinstance(lm, nn.Module):
        lm = AutoModelForCausalLM.from_pretrained(lm)
    return lm


def _check_lm_head(lm: nn.Module) -> None:
    """Raise if ``head(base_model(x).last_hidden_state)`` differs from the LM's own logits on a probe.

    The split into features extractor and action net assumes the LM's logits are its
    output embedding applied to the last hidden state; soft-capping or scaling of logits
    would make SB3's distribution differ from the LM's, silently.
    """
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
        keys = set(observation_space.spaces) if isinstance(observation_space, spaces.Dict) else set()
        if not {"input_ids", "attention_mask"} <= keys <= {"input_ids", "attention_mask", "agent_mask"}:
            raise ValueError(
                f"expected TokenRLHF-v0's Dict(input_ids, attention_mask[, agent_mask]) space, got {observation_space}"
            )
        lm = _load_lm(lm)
        super().__init__(observation_space, features_dim=lm.get_output_embeddings().in_features)
        self.lm = lm

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        # padding columns shared by every row carry nothing: same hidden states, less work
        ids, mask = crop_left_padding(observations["input_ids"].long(), observations["attention_mask"].long())
        out = self.lm.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        return out.last_hidden_state[:, -1]


class TemperatureHead(nn.Module):
    """The LM head as SB3's action net: ``logits / temperature`` (float32), the env's sampling distribution."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head = head
        self.temperature = temperature

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden).float() / self.temperature


class LMActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic whose actor is a Hugging Face causal LM (see the module docstring and docs/sb3.md).

    Use it as ``PPO(LMActorCriticPolicy, env, policy_kwargs={"lm": ..., "temperature": ...})``.
    ``policy.lm`` is the (trained) LM; ``policy.save_pretrained(dir)`` writes it in
    Hugging Face format.

    :param lm: a causal LM, or a directory / hub name ``from_pretrained`` loads
        (default: the embedded task's SFT policy). A module is trained in place.
    :param temperature: the action distribution is ``softmax(lm_logits / temperature)``;
        use the env's temperature, or the env's KL compares different distributions.
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
        disable_dropout(lm)  # rollout and update forwards must agree (first PPO ratio exactly 1)
        self.temperature = float(temperature)
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
        self.value_net = value_head(self.features_dim)  # V = 0 at the start: no noisy advantages from a random head
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """What ``PPO.load`` rebuilds the policy from: the LM and temperature, not the fixed arguments."""
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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The LM in Hugging Face format (``AutoModelForCausalLM.from_pretrained`` loads it), value head beside it."""
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        save_value_head(self.value_net, directory)


class SB3PolicyLogprobs:
    """The env's ``policy=`` callable for an SB3 policy: observation batch -> log-probs (N, vocab).

    The env is made before the SB3 model, so set the policy afterwards::

        kl = SB3PolicyLogprobs()
        env = TokenVecEnv(num_envs=16, policy=kl)   # or gym.make("TokenRLHF-v0", policy=kl)
        model = PPO(LMActorCriticPolicy, env)
        kl.policy = model.policy

    Any SB3 policy with a Categorical action distribution works. Each call runs one
    explicit forward of the policy on the observations it is given, so the log-probs
    never depend on what the policy ran before (cost: docs/sb3.md). Deliberately not a
    ``torch.nn.Module``: the env would take a module for a causal LM to step with a KV cache.
    """

    def __init__(self, policy: ActorCriticPolicy | None = None):
        self.policy = policy

    @torch.no_grad()
    def __call__(self, observation: dict[str, np.ndarray]) -> Tensor:
        if self.policy is None:
            raise RuntimeError(
                "SB3PolicyLogprobs has no policy yet: after making the SB3 model, set kl.policy = model.policy"
            )
        obs, _ = self.policy.obs_to_tensor(observation)
        distribution = self.policy.get_distribution(obs).distribution
        if not isinstance(distribution, torch.distributions.Categorical):
            raise TypeError(f"expected a Categorical action distribution (Discrete actions), got {type(distribution)}")
        return distribution.logits  # torch normalises Categorical logits: these are log-probabilities
