"""PPO's clipped losses and the KL estimators, per token, aggregated over the valid response tokens.

How per-token terms become one number (``aggregate``) changes the length bias:

- ``token_mean`` (the default; TRL's PPO trainer, DeepSpeed-Chat, DAPO): every valid
  token of the minibatch weighs the same.
- ``sequence_mean`` (the original GRPO): the mean over sequences of each sequence's
  token mean, so the tokens of short responses weigh more.
- ``constant`` (Dr. GRPO, Liu et al. 2025): the sum over valid tokens divided by the
  number of sequences times a constant L (the env's max_new_tokens), so no
  per-sequence length normalisation at all.

The diagnostics (clipfrac, approx_kl, ratio mean) are token means whatever the aggregation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from agents.advantages import masked_mean

Aggregation = Literal["token_mean", "sequence_mean", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]


def aggregate(
    values: Tensor, mask: Tensor, aggregation: Aggregation = "token_mean", max_new_tokens: int | None = None
) -> Tensor:
    """Per-token ``values`` (B, T) to a scalar over the True entries of ``mask``, as ``aggregation`` says.

    Sequences without a valid token count in no denominator. ``max_new_tokens`` is the
    constant L of ``constant``.
    """
    if aggregation == "token_mean":
        return masked_mean(values, mask)
    sequences = mask.any(1).sum().clamp(min=1)
    if aggregation == "sequence_mean":
        return masked_mean(values, mask, dim=1).sum() / sequences
    if aggregation != "constant":
        raise ValueError(f"aggregation must be one of {Aggregation.__args__}, got {aggregation!r}")
    if max_new_tokens is None:
        raise ValueError("aggregation 'constant' needs max_new_tokens (the constant L)")
    return (values * mask).sum() / (sequences * max_new_tokens)


def aggregation_size(mask: Tensor, aggregation: Aggregation) -> Tensor:
    """What ``aggregate`` divides by, up to a constant: valid tokens for token_mean, else sequences with one.

    Weighting each micro-batch's aggregate by its size over the minibatch's gives the
    minibatch's aggregate, so gradient accumulation is exact for every aggregation.
    """
    return mask.sum() if aggregation == "token_mean" else mask.any(1).sum()


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    With log r = ref_logprobs - logprobs: k1 = -log r (unbiased, can be negative),
    k2 = (log r)^2 / 2 (biased, low variance), k3 = (r - 1) - log r (unbiased, >= 0).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be one of {KLEstimator.__args__}, got {estimator!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    *,
    clip_range_high: float | None = None,
    aggregation: Aggregation = "token_mean",
    max_new_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: aggregate of max(-A r, -A clip(r)).

    The ratio is clipped to [1 - clip_range, 1 + clip_range_high] ("clip-higher", DAPO,
    Yu et al. 2025); ``clip_range_high`` None is ``clip_range``, the symmetric clip.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_new_tokens)
    with torch.no_grad():
        stats = {
            "ppo/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimator of KL(old || new) (Schulman, "Approximating KL divergence")
            "ppo/approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ppo/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float,
    *,
    aggregation: Aggregation = "token_mean",
    max_new_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * aggregate of max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped_loss, clipped_loss), mask, aggregation, max_new_tokens)
    with torch.no_grad():
        # clipped counts only beyond the range: inside it, float rounding can make the two losses differ by an ulp
        clipped = (clipped_loss > unclipped_loss) & ((values - old_values).abs() > clip_range)
        stats = {"ppo/value_clipfrac": masked_mean(clipped.float(), mask)}
    return loss, stats
