"""A wrong solution of exercise I.3, for the checker's tests: the KL with the reward side's sign."""


def non_score_reward(ref_logprobs, logprobs, kl_coef):
    kl = ref_logprobs - logprobs
    return -kl_coef * kl, kl
