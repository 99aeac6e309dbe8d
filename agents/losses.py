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

Beside PPO's clipped surrogate: the sequence-level ratio of GSPO, the clipped and detached
importance weight of CISPO, dual-clip's bound for negative advantages, and the importance
weights that correct for a sampler whose log-probs differ from the learner's
(``sampler_weights``, ``mismatch_stats``). ``docs/algorithms.md`` has each formula and its paper.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from agents.advantages import masked_mean

Aggregation = Literal["token_mean", "sequence_mean", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]
RatioLevel = Literal["token", "sequence"]
Surrogate = Literal["clip", "cispo"]
SamplerCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


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


def importance_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: RatioLevel = "token") -> Tensor:
    """pi / pi_old per token (B, T), or GSPO's per sequence (Zheng et al. 2025) put on each of its tokens.

    'sequence': s_i = exp(mean over the sequence's valid tokens of log pi - log pi_old), the
    length-normalised sequence ratio (pi(y|x) / pi_old(y|x))^(1/|y|); its gradient reaches every token.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"level must be one of {RatioLevel.__args__}, got {level!r}")
    return torch.exp(masked_mean(log_ratio, mask, dim=1))[:, None].expand_as(log_ratio)


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, low: float, high: float, dual_clip_c: float | None
) -> tuple[Tensor, Tensor]:
    """PPO's per-token loss max(-A r, -A clip(r, 1 - low, 1 + high)), and where a clip decided it.

    Dual-clip (Ye et al. 2020): where A < 0 the loss is also bounded above by -c A, so a ratio far
    above 1 on a bad action cannot push the loss (and its gradient) without bound.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss, decided = torch.maximum(unclipped, clipped), clipped > unclipped
    if dual_clip_c is not None:
        bound = -dual_clip_c * advantages
        dual = (advantages < 0) & (loss > bound)
        loss, decided = torch.where(dual, bound, loss), decided | dual
    return loss, decided


def cispo_surrogate(ratio: Tensor, logprobs: Tensor, advantages: Tensor, high: float) -> tuple[Tensor, Tensor]:
    """CISPO's per-token loss (MiniMax-M1, Chen et al. 2025): -sg(min(r, 1 + high)) * A * log pi, and where r was cut.

    The importance weight is clipped and detached instead of the surrogate, so every token keeps
    the gradient of its log-prob; as in the paper, no lower bound.
    """
    weight = torch.clamp(ratio, max=1.0 + high).detach()
    return -weight * advantages * logprobs, ratio > 1.0 + high


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
    level: RatioLevel = "token",
    surrogate: Surrogate = "clip",
    dual_clip_c: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: aggregate of max(-A r, -A clip(r)).

    The ratio is clipped to [1 - clip_range, 1 + clip_range_high] ("clip-higher", DAPO,
    Yu et al. 2025); ``clip_range_high`` None is ``clip_range``, the symmetric clip. ``level``:
    the ratio per token or per sequence (GSPO, ``importance_ratio``); ``surrogate``: 'clip' or
    'cispo' (``cispo_surrogate``); ``dual_clip_c``: dual-clip's bound for A < 0 (``clipped_surrogate``).
    ``weights`` (no gradient): each token's loss times its weight before aggregation, the sampler
    correction of ``sampler_weights``.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = importance_ratio(logprobs, old_logprobs, mask, level)
    if surrogate == "cispo":
        per_token, clipped = cispo_surrogate(ratio, logprobs, advantages, high)
    elif surrogate == "clip":
        per_token, clipped = clipped_surrogate(ratio, advantages, clip_range, high, dual_clip_c)
    else:
        raise ValueError(f"surrogate must be one of {Surrogate.__args__}, got {surrogate!r}")
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate(per_token, mask, aggregation, max_new_tokens)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {
            "ppo/clipfrac": masked_mean(clipped.float(), mask),
            # k3 estimator of KL(old || new) (Schulman, "Approximating KL divergence"), per token whatever the level
            "ppo/approx_kl": masked_mean((torch.exp(log_ratio) - 1) - log_ratio, mask),
            "ppo/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def sampler_weights(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: SamplerCorrection, cap: float):
    """Importance weights (B, T) from the sampler's distribution to the learner's, capped as ``mode`` says.

    rho = exp(log pi_learner - log pi_sampler) per token ('token_*'), or per sequence ('sequence_*':
    exp of the sum over the sequence's valid tokens, on each of its tokens). '*_truncate': min(rho, cap)
    (truncated importance sampling); '*_mask': 0 where rho > cap. 0 off the mask. The modes and
    their meaning are TRL's ``vllm_importance_sampling_mode``.
    """
    if mode not in SamplerCorrection.__args__:
        raise ValueError(f"mode must be one of {SamplerCorrection.__args__}, got {mode!r}")
    level, _, constraint = mode.partition("_")
    diff = torch.where(mask, logprobs - sampler_logprobs, torch.zeros_like(logprobs))
    if level == "sequence":
        diff = diff.sum(1, keepdim=True).expand_as(diff)
    rho = torch.exp(diff)
    rho = torch.clamp(rho, max=cap) if constraint == "truncate" else torch.where(rho > cap, 0.0, rho)
    return torch.where(mask, rho, torch.zeros_like(rho))


def mismatch_stats(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the sampler's log-probs of the taken tokens are from the learner's, over the valid tokens.

    With log rho = log pi_learner - log pi_sampler on tokens drawn from the sampler: the mean and max
    of |log rho|, the k3 estimate of KL(sampler || learner), E[(rho - 1) - log rho], and the effective
    sample size of the token weights rho as a fraction of the tokens, (sum rho)^2 / (n sum rho^2): 1 when
    the two agree, towards 1/n when one token carries all the weight.
    """
    log_rho = torch.where(mask, logprobs - sampler_logprobs, torch.zeros_like(logprobs))
    rho = torch.where(mask, torch.exp(log_rho), torch.zeros_like(log_rho))
    count = mask.sum().clamp(min=1)
    return {
        "mismatch/abs_log_ratio_mean": masked_mean(log_rho.abs(), mask),
        "mismatch/abs_log_ratio_max": log_rho.abs().max(),  # 0 off the mask
        "mismatch/kl": masked_mean(torch.expm1(log_rho) - log_rho, mask),
        "mismatch/ess": rho.sum() ** 2 / (count * (rho**2).sum()).clamp(min=1e-30),
    }


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
