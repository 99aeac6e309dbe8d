"""PPO's clipped losses, per token, averaged over the valid response tokens.

The means are over tokens (every valid token of the minibatch weighs the same),
as in TRL's PPO trainer and DeepSpeed-Chat; a mean over sequences would give the
tokens of short responses more weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.advantages import masked_mean


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: masked mean of max(-A r, -A clip(r))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "ppo/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimator of KL(old || new) (Schulman, "Approximating KL divergence")
            "ppo/approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ppo/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        # clipped counts only beyond the range: inside it, float rounding can make the two losses differ by an ulp
        clipped = (clipped_loss > unclipped_loss) & ((values - old_values).abs() > clip_range)
        stats = {"ppo/value_clipfrac": masked_mean(clipped.float(), mask)}
    return loss, stats
