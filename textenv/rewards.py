"""The per-step reward of RLHF as pure functions: log-probabilities, the KL penalty, the score terms.

    kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)
    r_t  = -kl_coef * kl_t + score_term_t

``score_term_t`` is the reward model's score on the last step of the episode and
0 before ("sparse"), or the change of score from prefix s_t to s_{t+1}
("dense", potential-based shaping: the terms of an episode sum to the final score
minus the prompt's score). When the acting policy's log-probability is unknown,
the KL term becomes ``kl_coef * log pi_ref(a_t|s_t)``: a learner with an entropy
bonus of the same coefficient then maximises exactly the KL-regularised objective,
because E[log pi_ref] + H(pi) = -KL(pi || pi_ref).
"""

from __future__ import annotations

import torch
from torch import Tensor


def non_score_reward(ref_logprobs: Tensor, logprobs: Tensor | None, kl_coef: float) -> tuple[Tensor, Tensor | None]:
    """(reward, kl) of the KL penalty per step; ``kl`` is None when ``logprobs`` is None.

    With the acting policy's log-probs: ``-kl_coef * (logprobs - ref_logprobs)``.
    Without them: ``kl_coef * ref_logprobs`` (see the module docstring).
    """
    if logprobs is None:
        return kl_coef * ref_logprobs, None
    kl = logprobs - ref_logprobs
    return -kl_coef * kl, kl


def clip_score(score: Tensor, score_clip: float | None) -> Tensor:
    """Clip scores to [-score_clip, score_clip] (DeepSpeed-Chat clips at 5); None leaves them."""
    return score if score_clip is None else score.clamp(-score_clip, score_clip)


def score_terms(final: Tensor, ended: Tensor, previous: Tensor | None = None) -> Tensor:
    """The score part of this step's reward, per slot. All tensors (N,).

    Sparse (``previous`` is None): ``final`` (the clipped score) where the episode
    ``ended`` this step, else 0. Dense: ``final - previous``, the change of the
    clipped prefix score.
    """
    if previous is None:
        return torch.where(ended, final, torch.zeros_like(final))
    return final - previous


def missing_eos_terms(terms: Tensor, cut_off: Tensor, missing_eos_penalty: float | None) -> Tensor:
    """``terms`` less ``missing_eos_penalty`` where the episode was ``cut_off`` (its last turn reached
    ``max_new_tokens`` before EOS or its end-of-turn token); unchanged without a penalty."""
    if not missing_eos_penalty:
        return terms
    return terms - missing_eos_penalty * cut_off.to(terms.dtype)
