"""A correct solution of exercise I.2, for the checker's tests."""

import torch


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return per_token[mask].mean()
