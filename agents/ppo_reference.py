"""PPO, RLOO, GRPO and REINFORCE's update on one page: the readable spec of ``agents.ppo.ppo_update``.

``ppo_update`` is the update the trainer runs, five calls deep for speed; this is the
same update written plainly, in the manner of CleanRL's ``ppo.py``: one episode to a
padded row, one teacher-forced forward per minibatch through the agent's ordinary
forward, the losses written out. ``tests/agents/test_ppo_reference.py`` runs both on one
rollout from the same weights (the fast update on the agent as ``ActorCritic.from_models``
builds it, this one on the Hugging Face models as they load) and checks that they end at
the same weights to float rounding. What the fast update does differently, each the same
numbers to rounding:

- micro-batches: gradients accumulate, each micro-batch weighted by its share of the
  minibatch's tokens or sequences (``losses.aggregation_size``). Here: the whole minibatch
  at once, so ``micro_batch_size`` is not read.
- the forward: episodes cropped to their own longest prompt and response, packed several
  to a row (``agents.packing``), the LM head run only where an action is predicted, the
  tied embedding's gradient as sparse rows, the entropy's backward skipped when
  ``ent_coef`` is 0, optionally under autocast. Here: the rollout's full padded layout,
  every logit, autograd's own backward, float32; ``pack_episodes`` is not read.
- old log-probs and values: re-scored in the first epoch's micro-batches, so the first
  ratio is exactly 1. Here: one no-grad forward over the whole rollout (a ratio of 1 to
  about 1e-7).
- GAE: all rows at once, each row's agent steps gathered to its front. Here: row by row.

Everything else, and every departure from textbook PPO listed in ``agents.ppo``, is the
same. The math both share is the pure functions of ``agents.advantages`` and
``agents.losses`` (GAE, group baselines, whitening, aggregation, KL estimators), each tested
against values worked out by hand. This returns no metrics: it is read, not run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.advantages import (
    compute_gae,
    equal_groups,
    group_centered,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    scale_advantages,
)
from agents.losses import aggregate, kl_estimate, sampler_weights
from agents.policy import ActorCritic
from agents.ppo import PPOConfig
from agents.rollout import Rollout
from textenv.lm import logprobs_from_logits, position_ids_from_mask


def ppo_update_reference(
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: PPOConfig,
    temperature: float,
    generator: torch.Generator,
    *,
    kl_coef: float,
    max_new_tokens: int | None = None,
) -> None:
    """K epochs of clipped PPO over ``rollout``: ``ppo_update``'s arguments (less autocast), its end weights."""
    device = next(agent.parameters()).device
    mask, rewards = rollout.mask.to(device), rollout.rewards.to(device)  # (B, T): True on the agent's steps
    batch = len(mask)
    # each epoch's minibatch order, all drawn before anything else uses the generator
    permutations = [torch.randperm(batch, generator=generator) for _ in range(config.epochs)]
    with torch.no_grad():
        old_logprobs, old_values, _ = score(agent, rollout, torch.arange(batch), temperature)

    mask, advantages, returns = rewards_to_advantages(rollout, mask, rewards, old_values, config, kl_coef)
    weights = None  # the sampler correction: rho = pi_learner / pi_sampler per token or sequence, capped
    if config.sampler_correction is not None:
        sampler = rollout.logprobs.to(device)
        weights = sampler_weights(old_logprobs, sampler, mask, config.sampler_correction, config.sampler_correction_cap)

    ref_logprobs = rollout.ref_logprobs.to(device)
    value_scale = 1.0  # normalize_value_loss: the larger of Var(returns) and the old values' mean squared error
    if config.uses_critic and config.normalize_value_loss:
        squared_error = ((returns - old_values[:, :-1]) ** 2)[mask].mean()
        value_scale = max(float(masked_var(returns, mask)), float(squared_error))
        value_scale = value_scale if value_scale > 1e-8 else 1.0  # nothing to explain: the plain loss
    agg = {"aggregation": config.loss_aggregation, "max_new_tokens": max_new_tokens}
    for permutation in permutations:
        for rows in permutation.split(config.minibatch_size):
            logprobs, values, entropy = score(agent, rollout, rows, temperature)
            m, adv = mask[rows], advantages[rows]

            per_token = surrogate_loss(logprobs, old_logprobs[rows], adv, m, config)
            if weights is not None:
                per_token = per_token * weights[rows]
            pg_loss = aggregate(per_token, m, **agg)
            loss = pg_loss
            if config.uses_critic:  # the clipped value loss: V may move at most clip_range_value from V_old
                new, old, target = values[:, :-1], old_values[rows, :-1], returns[rows]
                clipped = old + (new - old).clamp(-config.clip_range_value, config.clip_range_value)
                vf_loss = 0.5 * aggregate(torch.maximum((new - target) ** 2, (clipped - target) ** 2), m, **agg)
                vf_loss = vf_loss / value_scale
                loss = loss + config.vf_coef * vf_loss
            loss = loss - config.ent_coef * aggregate(entropy, m, **agg)
            if config.kl_penalty == "loss":  # GRPO's KL term, its gradient through the new log-probs
                kl = kl_estimate(logprobs, ref_logprobs[rows], config.kl_estimator)
                loss = loss + kl_coef * aggregate(kl, m, **agg)

            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
            # no step on a NaN or inf gradient, nor on a minibatch of filtered groups only (Adam's momentum
            # would still move the weights)
            if torch.isfinite(grad_norm) and not (config.filter_equal_groups and grad_norm == 0):
                optimizer.step()


def surrogate_loss(logprobs: Tensor, old_logprobs: Tensor, adv: Tensor, m: Tensor, config: PPOConfig) -> Tensor:
    """The per-token policy loss (B, T): the clipped surrogate (Schulman et al. 2017, eq. 7), as a loss, with its
    variants: GSPO's sequence ratio, dual-clip's bound for A < 0, or CISPO's clipped, detached weight."""
    low, high = config.clip_range, config.clip_range if config.clip_range_high is None else config.clip_range_high
    ratio = torch.exp(logprobs - old_logprobs)
    if config.importance_sampling_level == "sequence":  # GSPO: exp(mean log-ratio of the sequence), on its tokens
        ratio = torch.exp(masked_mean(logprobs - old_logprobs, m, dim=1))[:, None].expand_as(ratio)
    if config.surrogate == "cispo":  # the weight min(r, 1 + high), no gradient, times log pi
        return -ratio.clamp(max=1 + high).detach() * adv * logprobs
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    if config.dual_clip_c is not None:  # for A < 0, at most -c A
        per_token = torch.where(adv < 0, torch.minimum(per_token, -config.dual_clip_c * adv), per_token)
    return per_token


def rewards_to_advantages(
    rollout: Rollout, mask: Tensor, rewards: Tensor, old_values: Tensor, config: PPOConfig, kl_coef: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(mask, advantages, returns) of the update: the KL estimator swapped in, rewards whitened, equal groups
    filtered out of the mask, then GAE (ppo) or group baselines (rloo, grpo); returns only with a critic."""
    device = mask.device
    # rewards: the env's (score, and -beta * k1 on every step), k1 optionally swapped for k2 or k3
    if config.kl_penalty == "reward" and config.kl_estimator != "k1":
        logprobs, ref_logprobs, kl = (t.to(device) for t in (rollout.logprobs, rollout.ref_logprobs, rollout.kl))
        rewards = rewards + kl_coef * (kl - kl_estimate(logprobs, ref_logprobs, config.kl_estimator)) * mask
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if config.filter_equal_groups:  # a group of equal returns has no advantage: its tokens leave the mask
        mask = mask & ~equal_groups((rewards * mask).sum(1), config.group_size)[:, None]

    # advantages: GAE from the critic (ppo), the reward-to-go (reinforce: GAE with V = 0 and lambda = 1), or each
    # episode's return against its group's (rloo, grpo)
    returns = None
    terminated = rollout.terminated_steps.to(device)
    if config.algo == "ppo":
        advantages, returns = gae(rewards, old_values, terminated, mask, config.gamma, config.lam)
    elif config.algo == "reinforce":
        advantages, _ = gae(rewards, torch.zeros_like(old_values), terminated, mask, config.gamma, 1.0)
    else:
        episode_returns = (rewards * mask).sum(1)  # (B,)
        baseline = rloo_advantages if config.algo == "rloo" else group_centered
        centered = baseline(episode_returns, config.group_size)
        scaled = scale_advantages(centered, episode_returns, config.group_size, config.group_scaling, mask.any(1))
        advantages = scaled[:, None] * mask  # the episode's advantage on every one of its tokens
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    return mask, advantages, returns


def score(agent: ActorCritic, rollout: Rollout, rows: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced forward over the episodes ``rows``: log-probs of the actions (B, T), values (B, T + 1)
    V(s_0) .. V(s_T), entropies (B, T). Entries past an episode's end are read by nothing (the mask)."""
    device = next(agent.parameters()).device
    ids, attention = rollout.input_ids[rows].to(device), rollout.attention_mask[rows].to(device)  # (B, W + T)
    out = agent(ids, attention, position_ids_from_mask(attention))
    width = rollout.prompt_ids.shape[1]
    # position p predicts token p + 1: the logits at W - 1 .. W + T - 2 predict the T tokens after the prompt
    logprobs = logprobs_from_logits(out.logits[:, width - 1 : -1], temperature)  # (B, T, V)
    actions = rollout.actions[rows].to(device)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, actions[..., None])[..., 0], out.values[:, width - 1 :], entropy


def gae(
    rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over each episode's agent steps. Returns (advantages, returns), (B, T), 0 off the mask.

    In an episode of several turns the environment's tokens sit between the agent's steps:
    they are skipped, and the next state of a turn's last token is the state before the
    agent's next token, after the reply. The last step's next state is V(s_T), the bootstrap
    of a truncated episode (a terminated one ignores it).
    """
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for row in range(len(rewards)):
        steps = mask[row].nonzero()[:, 0]  # the row's agent columns, in order
        next_steps = torch.cat([steps[1:], steps[-1:] + 1])
        adv, ret = compute_gae(
            rewards[row, steps][None],
            values[row, steps][None],
            values[row, next_steps][None],
            terminated[row, steps][None],
            torch.ones(1, len(steps), dtype=torch.bool, device=mask.device),
            gamma,
            lam,
        )
        advantages[row, steps], returns[row, steps] = adv[0], ret[0]
    return advantages, returns
