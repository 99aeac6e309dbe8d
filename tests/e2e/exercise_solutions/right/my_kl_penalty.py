"""A correct solution of exercise I.3, for the checker's tests."""


def non_score_reward(ref_logprobs, logprobs, kl_coef):
    kl = logprobs - ref_logprobs
    return -kl_coef * kl, kl
