"""textenv/rewards.py against numbers worked out by hand."""

import torch

from textenv.rewards import clip_score, missing_eos_terms, non_score_reward, score_terms


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the KL term
def test_non_score_reward_with_policy_logprobs_is_minus_kl_coef_times_kl():
    ref = torch.tensor([-1.0, -2.0, -0.5])
    policy = torch.tensor([-0.5, -2.5, -0.5])
    reward, kl = non_score_reward(ref, policy, kl_coef=0.2)
    close(kl, [0.5, -0.5, 0.0])  # log pi - log pi_ref
    close(reward, [-0.1, 0.1, 0.0])  # -0.2 * kl


def test_non_score_reward_without_policy_logprobs_is_kl_coef_times_ref_logprob():
    ref = torch.tensor([-1.0, -2.0, -0.5])
    reward, kl = non_score_reward(ref, None, kl_coef=0.2)
    assert kl is None
    close(reward, [-0.2, -0.4, -0.1])  # 0.2 * log pi_ref


def test_non_score_reward_with_zero_coefficient_is_zero_but_kl_is_kept():
    reward, kl = non_score_reward(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), kl_coef=0.0)
    close(reward, [0.0, 0.0])
    close(kl, [-1.0, 2.0])


# --------------------------------------------------------------------------- score clipping
def test_clip_score_none_leaves_scores_unchanged():
    close(clip_score(torch.tensor([-7.0, -1.0, 0.5, 3.0, 10.0]), None), [-7.0, -1.0, 0.5, 3.0, 10.0])


def test_clip_score_clips_both_sides():
    scores = torch.tensor([-7.0, -1.0, 0.5, 3.0, 10.0])
    close(clip_score(scores, 5.0), [-5.0, -1.0, 0.5, 3.0, 5.0])
    close(clip_score(scores, 0.5), [-0.5, -0.5, 0.5, 0.5, 0.5])


# --------------------------------------------------------------------------- score terms
# four slots: 0 ends by EOS, 1 goes on, 2 is cut off at max_new_tokens (ended, no EOS), 3 ends by EOS
FINAL = [1.5, -2.0, 0.25, 3.0]
ENDED = [True, False, True, True]
CUT_OFF = [False, False, True, False]
PREVIOUS = [1.0, -1.0, 0.75, 3.0]


def terms(penalty, previous=None):
    found = score_terms(torch.tensor(FINAL), torch.tensor(ENDED), None if previous is None else torch.tensor(previous))
    return missing_eos_terms(found, torch.tensor(CUT_OFF), penalty)


def test_sparse_score_terms_give_the_score_only_where_the_episode_ended():
    close(terms(None), [1.5, 0.0, 0.25, 3.0])
    close(terms(0.0), [1.5, 0.0, 0.25, 3.0])  # a zero penalty is no penalty


def test_sparse_missing_eos_penalty_only_on_cut_off_rows():
    close(terms(1.0), [1.5, 0.0, -0.75, 3.0])  # 0.25 - 1.0 on slot 2 only


def test_dense_score_terms_are_final_minus_previous_on_every_row():
    close(terms(None, PREVIOUS), [0.5, -1.0, -0.5, 0.0])  # slot 1 (not ended) gets its change too


def test_dense_missing_eos_penalty_only_on_cut_off_rows():
    close(terms(1.0, PREVIOUS), [0.5, -1.0, -1.5, 0.0])  # -0.5 - 1.0 on slot 2 only
    close(terms(0.25, PREVIOUS), [0.5, -1.0, -0.75, 0.0])
