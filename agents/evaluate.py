"""Evaluation metrics of a batch of episodes: the one place they are computed.

Training logs them for its own rollouts (``env/...``) and for held-out prompts
(``eval/...``); the examples and the stable-baselines3 scripts report the same
figures through ``episode_metrics``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.policy import ActorCritic
from agents.rollout import Rollout, collect_rollout


def episode_metrics(scores: Tensor, kl: Tensor, lengths: Tensor, terminated: Tensor, prefix: str) -> dict[str, float]:
    """Per-episode tensors (B,): score, KL to the reference (summed over the response), length, ended by EOS.

    Returns the mean score and its std, the fraction scored positive, the mean KL
    per response, the mean length and the EOS rate, under ``prefix/``.
    """
    return {
        f"{prefix}/score": float(scores.mean()),
        f"{prefix}/score_std": float(scores.std()),
        f"{prefix}/positive_rate": float((scores > 0).float().mean()),
        f"{prefix}/kl": float(kl.mean()),
        f"{prefix}/response_length": float(lengths.float().mean()),
        f"{prefix}/eos_rate": float(terminated.float().mean()),
    }


def rollout_metrics(rollout: Rollout, prefix: str) -> dict[str, float]:
    """``episode_metrics`` of a rollout's episodes."""
    return episode_metrics(rollout.scores, rollout.kl.sum(1), rollout.mask.sum(1), rollout.terminated, prefix)


def evaluate(
    agent: ActorCritic, env, temperature: float, seed: int, generator: torch.Generator, autocast=None
) -> dict[str, float]:
    """``eval/...`` metrics of one lockstep batch of episodes on ``env``, the agent in eval mode."""
    agent.eval()
    return rollout_metrics(collect_rollout(agent, env, temperature, seed, generator, autocast), "eval")
