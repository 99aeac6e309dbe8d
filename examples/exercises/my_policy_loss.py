"""Exercise I.2 (docs/exercises.md): PPO's clipped policy loss. Replace the body, then run

    python examples/check_exercises.py --only policy_loss

which compares your loss and its gradient with agents.losses.policy_loss on random batches.
"""

from torch import Tensor


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """The clipped surrogate loss, a scalar tensor, differentiable in ``logprobs``.

    All inputs but clip_range are (B, T); mask is bool, True on the steps episodes took.

        rho_t = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(logprobs - old_logprobs)
        loss  = mean over the True entries of mask of  max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    with eps = clip_range: the negative of min(rho A, clip(rho) A), averaged over tokens
    (not over sequences). Where the clipped term is the larger one, the token's gradient
    must be exactly 0.
    """
    raise NotImplementedError("write policy_loss in examples/exercises/my_policy_loss.py")
