"""Collect a batch of episodes: the agent samples tokens with its own KV cache and steps the env.

The env runs in lockstep (``AutoresetMode.DISABLED``): one ``reset`` starts all B
episodes, and the rollout steps until every one has ended. The agent's KV cache
is its recurrent state, started from the reset's observation; each step it passes
its log-probs of the chosen tokens to the env (the fast path: the env then needs
no policy forward of its own for the KL penalty).

The layout the update re-scores is exactly the rollout's: the prompt block as the
env showed it (left-padded, cropped to its widest prompt) followed by one column
per step, masked where the episode had already ended.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from agents.policy import ActorCritic
from textenv.models import position_ids_from_mask


class Rollout(NamedTuple):
    prompt_ids: Tensor  # (B, W) left-padded
    prompt_mask: Tensor  # (B, W)
    actions: Tensor  # (B, T)
    logprobs: Tensor  # (B, T) log-probs at sampling time, from the KV cache
    rewards: Tensor  # (B, T) the env's rewards, 0 after the end
    mask: Tensor  # (B, T) bool, True on steps the episode took
    terminated: Tensor  # (B,) bool: ended with EOS
    truncated: Tensor  # (B,) bool: cut off at max_new_tokens
    scores: Tensor  # (B,) reward-model score of each response
    kl: Tensor  # (B, T) log pi - log pi_ref per step, 0 after the end
    prompts: list[str]
    responses: list[str]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.actions], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)

    def select(self, rows: Tensor) -> Rollout:
        """The episodes ``rows`` (tensors indexed; text lists too)."""
        picked = [t[rows] if isinstance(t, Tensor) else [t[i] for i in rows.tolist()] for t in self]
        return Rollout(*picked)

    @property
    def terminated_steps(self) -> Tensor:
        """(B, T) True at the last step of the episodes that ended with EOS."""
        last = self.mask.long().sum(1) - 1
        steps = torch.zeros_like(self.mask)
        steps[torch.arange(len(last)), last.clamp(min=0)] = True
        return steps & self.terminated[:, None]


@torch.no_grad()
def collect_rollout(
    agent: ActorCritic,
    env,
    temperature: float,
    seed: int,
    generator: torch.Generator,
    autocast: torch.autocast | None = None,
    group_size: int | None = None,
) -> Rollout:
    """Run one lockstep batch of ``env.num_envs`` episodes with ``agent`` sampling every token.

    ``group_size`` k: consecutive groups of k episodes share one prompt (RLOO, GRPO).
    """
    device = agent.value_head.weight.device
    observation, info = env.reset(seed=seed, options=None if group_size is None else {"group_size": group_size})
    ids = torch.as_tensor(observation["input_ids"], device=device)
    mask = torch.as_tensor(observation["attention_mask"], device=device)
    first = int(mask.any(0).long().argmax())  # crop the columns no prompt uses
    prompt_ids, prompt_mask = ids[:, first:], mask[:, first:]
    batch = len(prompt_ids)

    with autocast or torch.autocast(device.type, enabled=False):
        out = agent(prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), use_cache=True)
    logits, cache = out.logits[:, -1], out.cache
    position = position_ids_from_mask(prompt_mask)[:, -1]
    attention = prompt_mask
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    actions, logprobs, rewards, masks, kls = [], [], [], [], []
    scores = torch.zeros(batch)
    responses = [""] * batch
    terminated = np.zeros(batch, dtype=bool)
    truncated = np.zeros(batch, dtype=bool)
    while alive.any():
        action, logprob, _ = agent.get_action_and_value(logits, temperature, generator=generator)
        _, reward, term, trunc, step_info = env.step(action.cpu().numpy(), logprobs=logprob.cpu().numpy())
        actions.append(action)
        logprobs.append(torch.where(alive, logprob, 0.0))
        rewards.append(torch.as_tensor(reward, dtype=torch.float32))
        masks.append(alive.clone())
        kls.append(torch.as_tensor(np.nan_to_num(step_info["kl"]), dtype=torch.float32))
        for row in np.flatnonzero(term | trunc):
            scores[row] = float(step_info["score"][row])
            responses[row] = step_info["response"][row]
        terminated |= term
        truncated |= trunc
        was_alive = alive
        alive = alive & ~torch.as_tensor(term | trunc, device=device)
        if not alive.any():
            break
        attention = torch.cat([attention, was_alive.long()[:, None]], dim=1)
        with autocast or torch.autocast(device.type, enabled=False):
            out = agent(action[:, None], attention, position[:, None] + 1, cache=cache, use_cache=True)
        logits, cache, position = out.logits[:, -1], out.cache, position + 1

    return Rollout(
        prompt_ids=prompt_ids.cpu(),
        prompt_mask=prompt_mask.cpu(),
        actions=torch.stack(actions, 1).cpu(),
        logprobs=torch.stack(logprobs, 1).cpu(),
        rewards=torch.stack(rewards, 1),
        mask=torch.stack(masks, 1).cpu(),
        terminated=torch.as_tensor(terminated),
        truncated=torch.as_tensor(truncated),
        scores=scores,
        kl=torch.stack(kls, 1),
        prompts=list(info["prompt"]),
        responses=responses,
    )
