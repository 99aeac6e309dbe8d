"""Exercise I.3 (docs/exercises.md): the KL penalty per token. Replace the body, then run

    python examples/check_exercises.py --only kl_penalty

which compares your function with textenv.rewards.non_score_reward on random inputs.
"""

from torch import Tensor


def non_score_reward(ref_logprobs: Tensor, logprobs: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """(reward, kl), each shaped like the inputs (any shape, one entry per sampled token).

    - logprobs: log pi(a_t|s_t) of the tokens the actor sampled; ref_logprobs: the
      reference model's log pi_ref(a_t|s_t) of the same tokens.
    - kl: the one-sample estimate of KL(pi || pi_ref) at each token (either sign).
    - reward: the term the environment adds to each step's reward for it, with
      coefficient kl_coef (beta).
    """
    raise NotImplementedError("write non_score_reward in examples/exercises/my_kl_penalty.py")
