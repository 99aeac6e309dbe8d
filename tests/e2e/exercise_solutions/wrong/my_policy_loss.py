"""A wrong solution of exercise I.2, for the checker's tests: the right value, the wrong gradient (a detached clip)."""

import torch


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.detach().clamp(1 - clip_range, 1 + clip_range)  # detached: moves no gradient, even inside
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
    return per_token[mask].mean()
