"""Advantages and the masked statistics every per-token mean goes through.

All tensors are (B, T): B episodes, T response steps, padded on the right; ``mask``
is True on the steps an episode really took. It is built once per rollout and
used for every mean, so no step after an episode's end leaks into a statistic.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

GroupScaling = Literal["group", "batch", "none"]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (over ``dim``, or all)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance over the True entries of ``mask``."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise to unit variance over the mask (and zero mean, if ``shift_mean``); 0 outside the mask."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the mask: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). Returns (advantages, returns), (B, T).

    Args:
        rewards: r_t. values: V(s_t). next_values: V(s_{t+1}), used only where the
            episode goes on or was truncated.
        terminated: True at the step that ended the episode by itself (EOS): no bootstrap,
            V(s_{t+1}) = 0 there. A truncated episode's last step bootstraps from next_values.
        mask: True on real steps; the last True step of a row ends its episode.

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = delta_t + gamma * lam * A_{t+1}, with A_{t+1} = 0 after the episode's last step
    returns = A_t + V(s_t)
    """
    if not (rewards.shape == values.shape == next_values.shape == terminated.shape == mask.shape):
        raise ValueError(
            "rewards, values, next_values, terminated and mask must share one (B, T) shape; got "
            f"{[tuple(t.shape) for t in (rewards, values, next_values, terminated, mask)]}"
        )
    mask = mask.bool()
    continues = torch.zeros_like(mask)  # True where step t+1 belongs to the same episode
    continues[:, :-1] = mask[:, 1:]
    deltas = rewards + gamma * next_values * (~terminated.bool()).to(values.dtype) - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = deltas[:, t] + gamma * lam * continues[:, t].to(values.dtype) * running
        advantages[:, t] = running
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    return advantages, torch.where(mask, advantages + values, torch.zeros_like(values))


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024). (B,) -> (B,).

    Episodes come in consecutive groups of ``group_size`` on one prompt; each one's
    baseline is the mean return of the other k - 1: A_i = R_i - mean_{j != i} R_j.
    """
    grouped = _groups(returns, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(returns: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages (GRPO, Shao et al. 2024): A_i = (R_i - mean R) / (std R + eps) per group."""
    return scale_advantages(group_centered(returns, group_size), returns, group_size, "group", eps=eps)


def group_centered(returns: Tensor, group_size: int) -> Tensor:
    """Each return minus its group's mean, A_i = R_i - mean R: GRPO's advantage before its scaling. (B,) -> (B,)."""
    grouped = _groups(returns, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).reshape(-1)


def scale_advantages(
    advantages: Tensor,
    returns: Tensor,
    group_size: int,
    scaling: GroupScaling,
    valid: Tensor | None = None,
    eps: float = 1e-4,
) -> Tensor:
    """Divide episode advantages (B,) by a std (plus ``eps``), as ``scaling`` says.

    'group' (GRPO): the unbiased std of the returns of the episode's group. 'batch'
    (REINFORCE++, Hu 2025): the unbiased std of the advantages over the batch's
    ``valid`` episodes (default all). 'none' (Dr. GRPO, Liu et al. 2025): no division.
    """
    if scaling == "group":
        std = _groups(returns, group_size).std(1, keepdim=True)
        return (_groups(advantages, group_size) / (std + eps)).reshape(-1)
    if scaling == "batch":
        valid = torch.ones_like(advantages, dtype=torch.bool) if valid is None else valid
        return advantages / (masked_var(advantages, valid).sqrt() + eps)
    if scaling == "none":
        return advantages
    raise ValueError(f"scaling must be one of {GroupScaling.__args__}, got {scaling!r}")


def equal_groups(returns: Tensor, group_size: int, tol: float = 1e-6) -> Tensor:
    """(B,) bool: True on the episodes of groups whose returns all lie within ``tol`` of each other.

    Such a group carries no advantage, hence no gradient (DAPO's dynamic-sampling filter, Yu et al. 2025).
    """
    grouped = _groups(returns, group_size)
    spread = grouped.max(1, keepdim=True).values - grouped.min(1, keepdim=True).values
    return (spread <= tol).expand_as(grouped).reshape(-1)


def _groups(returns: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or returns.ndim != 1 or len(returns) % group_size:
        raise ValueError(
            f"group baselines need a 1-D batch of returns in groups of k >= 2; got shape {tuple(returns.shape)} "
            f"and group_size {group_size}"
        )
    return returns.reshape(-1, group_size)
