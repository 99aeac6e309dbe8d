"""One policy-gradient update on a rollout: re-score, advantages, K epochs of clipped losses.

The same update serves three algorithms; they differ only in their advantages and
in whether a critic is trained:

- ``ppo``: GAE(gamma, lambda) from the critic's values; clipped value loss.
- ``rloo``: the episode's return minus the mean return of the other episodes on the
  same prompt (leave-one-out baseline), on every token; no critic.
- ``grpo``: the episode's return normalised within its group of episodes on the same
  prompt; no critic. Unlike the GRPO paper, the KL penalty stays in the reward
  (where the env puts it) instead of a separate loss term.

The algorithm picks its advantage function once (``ADVANTAGES``); the rest of
the update is the same code for all three.

Where this departs from the textbook PPO (Schulman et al. 2017) and why:

- old log-probs and values come from a teacher-forced, no-grad pass over the
  rollout in the exact micro-batches of the first epoch, not from the sampling
  pass. The two agree to about 1e-6 in float32 but not bitwise (a KV cache sums in
  another order), and far less under bf16; re-scoring makes the first minibatch's
  ratio exactly 1. The sampling log-probs still feed the env's KL penalty.
- the critic is a value head on the policy's trunk (or a separate trunk) and one
  combined loss ``pg + vf_coef * vf - ent_coef * entropy`` trains both.
- advantages are whitened over valid tokens; rewards optionally scaled (no shift).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from agents.advantages import (
    compute_gae,
    explained_variance,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    rloo_advantages,
)
from agents.losses import policy_loss, value_loss
from agents.policy import ActorCritic
from agents.rollout import Rollout
from textenv.config import check_choice, check_float, check_int
from textenv.lm import entropy_from_logits, position_ids_from_mask, token_logprobs

Algo = Literal["ppo", "rloo", "grpo"]


@dataclass
class PPOConfig:
    """The PPO update. Defaults are tuned for the embedded default task on a CPU."""

    algo: Algo = "ppo"
    """'ppo' (critic + GAE), 'rloo' or 'grpo' (critic-free group baselines)."""
    group_size: int = 4
    """rloo/grpo: episodes per prompt (each rollout holds batch_size / group_size prompts)."""
    epochs: int = 4
    """K: passes over each rollout."""
    minibatch_size: int = 16
    """Episodes per optimizer step."""
    micro_batch_size: int = 16
    """Episodes per forward/backward; gradients accumulate up to ``minibatch_size``."""
    learning_rate: float = 3e-4
    """Adam learning rate at the start; it decays linearly to 0 over the run."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Epsilon of the clipped surrogate."""
    clip_range_value: float = 0.2
    """Epsilon of the clipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the combined loss (small: the trunk is shared)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the valid tokens of the rollout."""
    whiten_rewards: bool = False
    """Scale rewards to unit std over valid tokens (no mean shift) before GAE."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise on a setting out of range, of the wrong type or not finite, naming the field."""
        check_choice("algo", self.algo, Algo)
        for name in ("group_size", "epochs", "minibatch_size", "micro_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_float("learning_rate", self.learning_rate, "> 0", lambda v: v > 0)
        for name in ("gamma", "lam"):
            check_float(name, getattr(self, name), "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("clip_range", "clip_range_value", "max_grad_norm"):
            check_float(name, getattr(self, name), "> 0", lambda v: v > 0)
        for name in ("vf_coef", "ent_coef"):
            check_float(name, getattr(self, name), ">= 0", lambda v: v >= 0)
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )

    @property
    def uses_critic(self) -> bool:
        return self.algo == "ppo"


@dataclass
class Scored:
    """A teacher-forced forward over rollout episodes."""

    logprobs: Tensor  # (B, T)
    values: Tensor  # (B, T + 1): V(s_0) .. V(s_T)
    entropy: Tensor  # (B, T)


def score_rollout(agent: ActorCritic, rollout: Rollout, temperature: float, autocast=None) -> Scored:
    """One forward over prompt + response: log-probs of the taken actions, values, entropies."""
    device = next(agent.parameters()).device
    ids, mask = rollout.input_ids.to(device), rollout.attention_mask.to(device)
    with autocast or torch.autocast(device.type, enabled=False):
        out = agent(ids, mask, position_ids_from_mask(mask))
    width, steps = rollout.prompt_ids.shape[1], rollout.actions.shape[1]
    logits = out.logits[:, width - 1 : width - 1 + steps]  # position p predicts token p + 1
    return Scored(
        logprobs=token_logprobs(logits, rollout.actions.to(device), temperature),
        values=out.values[:, width - 1 : width + steps],
        entropy=entropy_from_logits(logits, temperature),
    )


# ---------------------------------------------------------------- advantages, one function per algorithm
AdvantageFn = Callable[[Tensor, Tensor, Tensor, Tensor, PPOConfig], tuple[Tensor, Tensor]]


def gae(rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, config: PPOConfig) -> tuple[Tensor, Tensor]:
    """PPO: GAE(gamma, lambda) from the critic's values V(s_0) .. V(s_T). Returns (advantages, returns)."""
    return compute_gae(rewards, values[:, :-1], values[:, 1:], terminated, mask, config.gamma, config.lam)


def group_baseline(baseline: Callable[[Tensor, int], Tensor]) -> AdvantageFn:
    """RLOO/GRPO: each episode's undiscounted return against its group's, on every token; no returns."""

    def advantages(rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, config: PPOConfig):
        episode_returns = (rewards * mask).sum(1)  # score - beta * KL of the episode
        return baseline(episode_returns, config.group_size)[:, None] * mask, torch.zeros_like(rewards)

    return advantages


ADVANTAGES: dict[str, AdvantageFn] = {
    "ppo": gae,
    "rloo": group_baseline(rloo_advantages),
    "grpo": group_baseline(grpo_advantages),
}


# ---------------------------------------------------------------- the update
def rescore(agent: ActorCritic, rollout: Rollout, micro_batches: list[Tensor], temperature: float, autocast):
    """Old log-probs (B, T) and values (B, T + 1), no-grad, in the micro-batches of the first epoch."""
    device = next(agent.parameters()).device
    batch, steps = rollout.actions.shape
    logprobs, values = torch.zeros(batch, steps, device=device), torch.zeros(batch, steps + 1, device=device)
    with torch.no_grad():
        for rows in micro_batches:
            scored = score_rollout(agent, rollout.select(rows), temperature, autocast)
            logprobs[rows.to(device)], values[rows.to(device)] = scored.logprobs, scored.values
    return logprobs, values


@dataclass
class Targets:
    """What the losses compare against, for every episode of the rollout: (B, T) each, values (B, T + 1)."""

    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    mask: Tensor


def minibatch_step(
    agent, optimizer, rollout: Rollout, minibatch: Tensor, targets: Targets, config: PPOConfig, temperature, autocast
) -> dict[str, list[float]]:
    """One optimizer step on ``minibatch``, accumulating gradients over its micro-batches; returns their stats."""
    stats: dict[str, list[float]] = defaultdict(list)
    device = targets.mask.device
    optimizer.zero_grad(set_to_none=True)
    minibatch_tokens = targets.mask[minibatch.to(device)].sum().clamp(min=1)
    for rows in minibatch.split(config.micro_batch_size):
        rows_d = rows.to(device)
        mask = targets.mask[rows_d]
        scored = score_rollout(agent, rollout.select(rows), temperature, autocast)
        pg_loss, pg_stats = policy_loss(
            scored.logprobs, targets.old_logprobs[rows_d], targets.advantages[rows_d], mask, config.clip_range
        )
        if config.uses_critic:
            old_values = targets.old_values[rows_d, :-1]
            vf_loss, vf_stats = value_loss(
                scored.values[:, :-1], old_values, targets.returns[rows_d], mask, config.clip_range_value
            )
        else:  # no critic; the zero term gives the unused value head zero gradients (DDP needs one)
            vf_loss, vf_stats = 0.0 * scored.values.sum(), {}
        entropy = masked_mean(scored.entropy, mask)
        loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
        # token-weighted, so accumulated micro-batches give the minibatch's token mean
        (loss * mask.sum() / minibatch_tokens).backward()
        for key, value in {**pg_stats, **vf_stats}.items():
            stats[key].append(float(value))
        stats["loss/policy"].append(pg_loss.item())
        stats["loss/value"].append(vf_loss.item())
        stats["loss/total"].append(loss.item())
        stats["policy/entropy"].append(entropy.item())
    grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
        stats["ppo/grad_norm"].append(float(grad_norm))
    stats["ppo/skipped_steps"].append(float(not torch.isfinite(grad_norm)))  # a NaN or inf gradient: no step
    return stats


def ppo_update(
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: PPOConfig,
    temperature: float,
    generator: torch.Generator,
    autocast=None,
) -> dict[str, float]:
    """K epochs of clipped PPO over ``rollout``; returns the update's metrics."""
    device = next(agent.parameters()).device
    permutations = [torch.randperm(len(rollout.actions), generator=generator) for _ in range(config.epochs)]
    first_epoch = [
        micro for mb in permutations[0].split(config.minibatch_size) for micro in mb.split(config.micro_batch_size)
    ]
    old_logprobs, old_values = rescore(agent, rollout, first_epoch, temperature, autocast)

    mask, rewards = rollout.mask.to(device), rollout.rewards.to(device)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ADVANTAGES[config.algo](
        rewards, old_values, rollout.terminated_steps.to(device), mask, config
    )
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    targets = Targets(old_logprobs, old_values, advantages, returns, mask)

    stats: dict[str, list[float]] = defaultdict(list)
    for perm in permutations:
        for minibatch in perm.split(config.minibatch_size):
            for key, values in minibatch_step(
                agent, optimizer, rollout, minibatch, targets, config, temperature, autocast
            ).items():
                stats[key].extend(values)

    metrics = {key: sum(values) / len(values) for key, values in stats.items() if values}
    metrics["ppo/skipped_steps"] = sum(stats["ppo/skipped_steps"])
    metrics["ppo/steps"] = len(stats["ppo/skipped_steps"])
    metrics["ppo/first_ratio_mean"] = stats["ppo/ratio_mean"][0]
    metrics["ppo/advantage_mean"] = float(masked_mean(advantages, mask))
    if config.uses_critic:
        metrics["ppo/explained_variance"] = explained_variance(old_values[:, :-1], returns, mask)
        metrics["ppo/return_mean"] = float(masked_mean(returns, mask))
        metrics["ppo/value_mean"] = float(masked_mean(old_values[:, :-1], mask))
    return metrics
