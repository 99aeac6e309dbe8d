"""A wrong solution of exercise I.1, for the checker's tests: it bootstraps after EOS as well."""

import torch


def compute_gae(rewards, values, next_values, terminated, mask, gamma, lam):
    advantages = torch.zeros_like(values)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(int(mask[b].sum()))):
            delta = float(rewards[b, t]) + gamma * float(next_values[b, t]) - float(values[b, t])  # no terminated
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages, torch.where(mask, advantages + values, torch.zeros_like(values))
