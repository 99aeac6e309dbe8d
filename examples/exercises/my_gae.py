"""Exercise I.1 (docs/exercises.md): generalised advantage estimation. Replace the body, then run

    python examples/check_exercises.py --only gae

which compares your function with agents.advantages.compute_gae on random batches.
"""

from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), each (B, T), of a right-padded batch of episodes.

    All inputs are (B, T): row b is one episode, its steps are the columns where
    ``mask[b]`` is True (a prefix of the row), and its last True column ends it.

    - rewards: r_t.  values: V(s_t).  next_values: V(s_{t+1}), the value of the state after
      step t (for the last step of a truncated episode, the state it was cut in).
    - terminated: bool, True at the step that ended its episode by itself (EOS). There
      is no future after it: V(s_{t+1}) counts as 0. An episode whose last step is not
      terminated was truncated, and its last step does bootstrap from next_values.

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1},   A = 0 after the episode's last step
        return_t = A_t + V(s_t)

    Both outputs are 0 where ``mask`` is False.
    """
    raise NotImplementedError("write compute_gae in examples/exercises/my_gae.py")
