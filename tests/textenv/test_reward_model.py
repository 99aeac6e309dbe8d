import math

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from textenv.default_task.training import bradley_terry_loss, calibrate_reward_model
from textenv.lm import pad_batch, position_ids_from_mask, sequence_scores, to_left_padding


def tiny_reward_model(num_labels: int = 1) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0, num_labels=num_labels
    )
    return GPT2ForSequenceClassification(config).eval()


def test_bradley_terry_loss_hand_values():
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2; -log sigmoid(-2) = log(1 + e^2)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.e**-1)
    )
    assert bradley_terry_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(math.log(2))
    mean = (math.log(1 + math.e**-1) + math.log(1 + math.e**2)) / 2
    assert bradley_terry_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(mean)


def test_bradley_terry_loss_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_score_is_read_at_the_last_real_token_for_either_padding_side():
    model = tiny_reward_model()
    sequences = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])
    left = sequence_scores(model, *pad_batch(sequences, 0, side="left"))
    right = sequence_scores(model, *pad_batch(sequences, 0, side="right"))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    # and the score changes when the last real token does (it is really read there)
    changed = sequence_scores(model, *pad_batch([[5, 6, 8]], 0))
    assert not torch.allclose(changed, alone[:1])


def test_to_left_padding_moves_real_tokens_to_the_end():
    ids, mask = pad_batch([[1, 2], [3, 4, 5, 6]], pad_token_id=0, side="right")
    left_ids, left_mask = to_left_padding(ids, mask, pad_token_id=0)
    assert left_ids.tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert left_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert position_ids_from_mask(left_mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_reward_model_with_several_outputs_is_rejected():
    with pytest.raises(ValueError, match=r"one scalar per sequence.*num_labels=1"):
        sequence_scores(tiny_reward_model(num_labels=2), *pad_batch([[1, 2]], 0))


def test_calibration_centres_neutral_texts_and_scales_to_unit_std():
    model = tiny_reward_model()
    everything = pad_batch([[i, i + 1, i + 2] for i in range(1, 40)], 0)
    neutral = pad_batch([[i, i + 1, i + 2] for i in range(1, 10)], 0)
    before = sequence_scores(model, *everything)
    calibrate_reward_model(model, neutral=neutral, everything=everything)
    after = sequence_scores(model, *everything)
    assert sequence_scores(model, *neutral).mean().item() == pytest.approx(0.0, abs=1e-5)
    assert after.std().item() == pytest.approx(1.0, abs=1e-4)
    # an affine map of the old scores: the ranking is unchanged
    assert torch.equal(before.argsort(), after.argsort())
