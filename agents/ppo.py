"""One policy-gradient update on a rollout: re-score, advantages, K epochs of clipped losses.

The same update serves three algorithms; they differ only in their advantages and
in whether a critic is trained:

- ``ppo``: GAE(gamma, lambda) from the critic's values; clipped value loss.
- ``rloo``: the episode's return minus the mean return of the other episodes on the
  same prompt (leave-one-out baseline), on every token; no critic.
- ``grpo``: the episode's return normalised within its group of episodes on the same
  prompt; no critic. Unlike the GRPO paper, the KL penalty stays in the reward
  (where the env puts it) instead of a separate loss term.

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
from dataclasses import dataclass

import torch
from torch import Tensor

from agents.advantages import compute_gae, grpo_advantages, masked_mean, masked_var, masked_whiten, rloo_advantages
from agents.losses import entropy_from_logits, policy_loss, value_loss
from agents.policy import ActorCritic
from agents.rollout import Rollout
from textenv.models import position_ids_from_mask
from textenv.rewards import token_logprobs


@dataclass
class PPOConfig:
    """The PPO update. Defaults are tuned for the embedded default task on a CPU."""

    algo: str = "ppo"
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
        entropy=entropy_from_logits(logits.float() / temperature),
    )


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the mask: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


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
    batch = len(rollout.actions)
    device = next(agent.parameters()).device
    permutations = [torch.randperm(batch, generator=generator) for _ in range(config.epochs)]
    micro_batches = [
        [micro for minibatch in perm.split(config.minibatch_size) for micro in minibatch.split(config.micro_batch_size)]
        for perm in permutations
    ]

    # Old log-probs and values, in the first epoch's micro-batches (see the module docstring).
    steps = rollout.actions.shape[1]
    old_logprobs, old_values = torch.zeros(batch, steps, device=device), torch.zeros(batch, steps + 1, device=device)
    with torch.no_grad():
        for rows in micro_batches[0]:
            scored = score_rollout(agent, rollout.select(rows), temperature, autocast)
            old_logprobs[rows.to(device)], old_values[rows.to(device)] = scored.logprobs, scored.values

    mask = rollout.mask.to(device)
    rewards = rollout.rewards.to(device)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    critic = config.algo == "ppo"
    if critic:
        advantages, returns = compute_gae(
            rewards,
            old_values[:, :-1],
            old_values[:, 1:],
            rollout.terminated_steps.to(device),
            mask,
            config.gamma,
            config.lam,
        )
    else:
        group_advantages = rloo_advantages if config.algo == "rloo" else grpo_advantages
        episode_returns = (rewards * mask).sum(1)  # undiscounted: score - beta * KL of the episode
        advantages = group_advantages(episode_returns, config.group_size)[:, None] * mask
        returns = torch.zeros_like(rewards)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    stats: dict[str, list[float]] = defaultdict(list)
    for perm in permutations:
        for minibatch in perm.split(config.minibatch_size):
            optimizer.zero_grad(set_to_none=True)
            minibatch_tokens = mask[minibatch.to(device)].sum().clamp(min=1)
            for rows in minibatch.split(config.micro_batch_size):
                rows_d = rows.to(device)
                micro_mask = mask[rows_d]
                scored = score_rollout(agent, rollout.select(rows), temperature, autocast)
                pg_loss, pg_stats = policy_loss(
                    scored.logprobs, old_logprobs[rows_d], advantages[rows_d], micro_mask, config.clip_range
                )
                if critic:
                    vf_loss, vf_stats = value_loss(
                        scored.values[:, :-1],
                        old_values[rows_d, :-1],
                        returns[rows_d],
                        micro_mask,
                        config.clip_range_value,
                    )
                else:  # no critic; the zero term gives the unused value head zero gradients (DDP needs one)
                    vf_loss, vf_stats = 0.0 * scored.values.sum(), {}
                entropy = masked_mean(scored.entropy, micro_mask)
                loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
                # token-weighted, so accumulated micro-batches give the minibatch's token mean
                (loss * micro_mask.sum() / minibatch_tokens).backward()
                for key, value in {**pg_stats, **vf_stats}.items():
                    stats[key].append(float(value))
                stats["loss/policy"].append(pg_loss.item())
                stats["loss/value"].append(vf_loss.item())
                stats["loss/total"].append(loss.item())
                stats["policy/entropy"].append(entropy.item())
            grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
            stats["ppo/grad_norm"].append(float(grad_norm))
            optimizer.step()

    metrics = {key: sum(values) / len(values) for key, values in stats.items()}
    metrics["ppo/first_ratio_mean"] = stats["ppo/ratio_mean"][0]
    metrics["ppo/advantage_mean"] = float(masked_mean(advantages, mask))
    if critic:
        metrics["ppo/explained_variance"] = explained_variance(old_values[:, :-1], returns, mask)
        metrics["ppo/return_mean"] = float(masked_mean(returns, mask))
        metrics["ppo/value_mean"] = float(masked_mean(old_values[:, :-1], mask))
    return metrics
