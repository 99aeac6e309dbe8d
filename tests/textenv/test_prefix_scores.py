"""``textenv.lm.prefix_scores`` and the env's ``prefix_scores``: the score of every prefix of a row from one forward,
each equal to a plain forward over that prefix alone, for every family; refused where it cannot be read."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2ForSequenceClassification

from tests.models import FAMILIES, tiny_config, tiny_reward_model, uncached_score
from textenv.lm import has_prefix_scores, prefix_scores

ROWS = [[5, 17, 9, 33, 8, 2], [40, 7, 7], [12, 30, 6, 25]]  # different lengths: left padding in the batch


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_each_positions_score_is_its_prefixs_uncached_score(family):
    reward_model = tiny_reward_model(family)
    ids, mask = left_padded(ROWS)
    scores = prefix_scores(reward_model, ids, mask)
    assert scores.shape == ids.shape and scores.dtype == torch.float32
    width = ids.shape[1]
    for row, tokens in enumerate(ROWS):
        start = width - len(tokens)
        expected = torch.tensor([uncached_score(reward_model, tokens[: k + 1]) for k in range(len(tokens))])
        torch.testing.assert_close(scores[row, start:], expected, atol=1e-5, rtol=0, msg=f"{family}, row {row}")
    assert reward_model.config.pad_token_id == tiny_reward_model(family).config.pad_token_id  # left as it was
    assert not reward_model.score._forward_hooks  # the hook was removed


def test_a_classifier_without_a_per_position_head_is_refused():
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=1
    )
    bert = BertForSequenceClassification(config).eval()  # pools the first token, then classifies: no prefix scores
    assert not has_prefix_scores(bert) and has_prefix_scores(tiny_reward_model("gpt2"))
    ids, mask = left_padded(ROWS)
    with pytest.raises(ValueError, match="BertForSequenceClassification has no per-position score head"):
        prefix_scores(bert, ids, mask)


def test_a_head_of_several_labels_is_refused():
    reward_model = GPT2ForSequenceClassification(tiny_config("gpt2", num_labels=2)).eval()
    ids, mask = left_padded(ROWS)
    with pytest.raises(ValueError, match=r"score head gave \(3, 6, 2\), not one scalar per position \(3, 6, 1\)"):
        prefix_scores(reward_model, ids, mask)


def test_the_envs_prefix_scores_are_clipped_as_its_scores_are(make_vec):
    env = make_vec(2).unwrapped
    ids, mask = left_padded([[3, 50, 61, 70, 80], [90, 91, 92]])
    raw = prefix_scores(env.reward_model, ids, mask)
    torch.testing.assert_close(env.prefix_scores(ids, mask), raw)  # the default task does not clip
    clip = float(raw[mask.bool()].abs().median())
    clipped = make_vec(2, score_clip=clip).unwrapped.prefix_scores(ids, mask)
    torch.testing.assert_close(clipped, raw.clamp(-clip, clip))
    assert (clipped != raw).any()


def test_the_envs_prefix_scores_are_refused_without_a_reward_model_of_its_tokens(make_vec):
    ids, mask = left_padded(ROWS)
    with pytest.raises(ValueError, match="no reward model"):
        make_vec(2, task="arithmetic").unwrapped.prefix_scores(ids, mask)
