"""A correct solution of exercise I.1, written from the formula (not from the library), for the checker's tests."""

import torch


def compute_gae(rewards, values, next_values, terminated, mask, gamma, lam):
    advantages = torch.zeros_like(values)
    for b in range(rewards.shape[0]):
        running = 0.0
        steps = int(mask[b].sum())
        for t in reversed(range(steps)):
            bootstrap = 0.0 if bool(terminated[b, t]) else float(next_values[b, t])
            delta = float(rewards[b, t]) + gamma * bootstrap - float(values[b, t])
            running = delta + gamma * lam * running
            advantages[b, t] = running
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns
