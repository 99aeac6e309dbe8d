"""textenv/default_task/training.py: the Bradley-Terry loss by hand, and the reward model's calibration."""

import math

import pytest
import torch

from tests.models import tiny_gpt2_reward_model
from textenv.default_task.training import bradley_terry_loss, calibrate_reward_model
from textenv.lm import pad_batch, sequence_scores


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


def test_calibration_centres_neutral_texts_and_scales_to_unit_std():
    model = tiny_gpt2_reward_model()
    everything = pad_batch([[i, i + 1, i + 2] for i in range(1, 40)], 0)
    neutral = pad_batch([[i, i + 1, i + 2] for i in range(1, 10)], 0)
    before = sequence_scores(model, *everything)
    calibrate_reward_model(model, neutral=neutral, everything=everything)
    after = sequence_scores(model, *everything)
    assert sequence_scores(model, *neutral).mean().item() == pytest.approx(0.0, abs=1e-5)
    assert after.std().item() == pytest.approx(1.0, abs=1e-4)
    # an affine map of the old scores: the ranking is unchanged
    assert torch.equal(before.argsort(), after.argsort())
