"""The sampler/learner mismatch: the rollout's own log-probs against the update's first re-score.

1. ``sampler_weights`` (TRL's four ``vllm_importance_sampling_mode`` modes) and ``mismatch_stats`` against values
   worked out here from the formulas.
2. On the default task: the ``mismatch/*`` metrics of ``ppo_update`` are ~0 (ESS ~1) when the sampler is the
   learner, and large when the sampler draws at another temperature than the learner scores at; the correction's
   weights are min(pi_learner / pi_sampler, C) of a plain forward, and change the loss only when the two differ.
3. The numbers docs/algorithms.md quotes are what its snippet prints.
"""

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from agents.losses import mismatch_stats, sampler_weights
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update
from agents.ppo_reference import score
from agents.rollout import collect_rollout
from textenv.default_task import POLICY_DIR

LEARNER = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
SAMPLER = [[-1.5, -0.5, -1.0], [-0.3, -2.5, 0.0]]
MASK = [[True, True, True], [True, True, False]]
# log rho = learner - sampler: 0.5, 0, -1 | 0, 1.3; per sequence: -0.5 | 1.3
E = math.exp


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_truncate", [[E(0.5), 1.0, E(-1.0)], [1.0, 3.0, 0.0]]),
        ("token_mask", [[E(0.5), 1.0, E(-1.0)], [1.0, 0.0, 0.0]]),
        ("sequence_truncate", [[E(-0.5)] * 3, [3.0, 3.0, 0.0]]),
        ("sequence_mask", [[E(-0.5)] * 3, [0.0, 0.0, 0.0]]),
    ],
)
def test_sampler_weights_truncate_or_mask_the_token_or_sequence_ratio_at_the_cap(mode, expected):
    weights = sampler_weights(torch.tensor(LEARNER), torch.tensor(SAMPLER), torch.tensor(MASK), mode, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_sampler_weights_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        sampler_weights(torch.tensor(LEARNER), torch.tensor(SAMPLER), torch.tensor(MASK), "token_clip", cap=3.0)


def test_mismatch_stats_hand_values():
    stats = mismatch_stats(torch.tensor(LEARNER), torch.tensor(SAMPLER), torch.tensor(MASK))
    log_rho = [0.5, 0.0, -1.0, 0.0, 1.3]
    rho = [E(x) for x in log_rho]
    assert stats["mismatch/abs_log_ratio_mean"].item() == pytest.approx(2.8 / 5)
    assert stats["mismatch/abs_log_ratio_max"].item() == pytest.approx(1.3)
    assert stats["mismatch/kl"].item() == pytest.approx(sum(E(x) - 1 - x for x in log_rho) / 5)
    assert stats["mismatch/ess"].item() == pytest.approx(sum(rho) ** 2 / (5 * sum(r * r for r in rho)))
    same = mismatch_stats(torch.tensor(LEARNER), torch.tensor(LEARNER), torch.tensor(MASK))
    assert [v.item() for v in same.values()] == [0.0, 0.0, 0.0, 1.0]


SIZES = dict(epochs=1, minibatch_size=8, micro_batch_size=8)


def update(rollout, temperature=1.0, **options):
    """One update of a fresh agent on ``rollout``, scored at ``temperature``; its metrics."""
    agent = ActorCritic.from_models(POLICY_DIR)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
    config = PPOConfig(**SIZES, **options)
    return ppo_update(
        agent.train(), optimizer, rollout, config, temperature, torch.Generator().manual_seed(0), kl_coef=0.05
    )


@pytest.fixture(scope="module")
def rollouts(env):
    """The same episodes' prompts sampled at the learner's temperature 1 (no mismatch) and at 2 (a perturbed
    sampler: its log-probs are of logits / 2 while the update scores logits / 1)."""
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    return {
        temperature: collect_rollout(agent, env, temperature, seed=0, generator=torch.Generator().manual_seed(0))
        for temperature in (1.0, 2.0)
    }


def test_mismatch_is_zero_when_the_sampler_is_the_learner_and_large_when_it_is_not(rollouts):
    same, perturbed = update(rollouts[1.0]), update(rollouts[2.0])
    assert same["mismatch/abs_log_ratio_max"] < 1e-4 and same["mismatch/kl"] < 1e-8
    assert same["mismatch/ess"] == pytest.approx(1.0, abs=1e-6)
    assert perturbed["mismatch/abs_log_ratio_mean"] > 0.1 and perturbed["mismatch/kl"] > 0.01
    assert perturbed["mismatch/ess"] < 0.95
    assert "mismatch/weight_mean" not in same  # logged only with a correction


def test_the_correction_weights_are_the_capped_ratio_of_a_plain_forward(rollouts):
    rollout = rollouts[2.0]
    metrics = update(rollout, sampler_correction="token_truncate", sampler_correction_cap=1.5)
    with torch.no_grad():
        learner, _, _ = score(ActorCritic.from_models(POLICY_DIR), rollout, torch.arange(8), 1.0)
    mask = rollout.mask
    rho = torch.exp(learner - rollout.logprobs)[mask]
    assert metrics["mismatch/weight_mean"] == pytest.approx(rho.clamp(max=1.5).mean().item(), abs=1e-4)
    assert metrics["mismatch/capped_frac"] == pytest.approx((rho > 1.5).float().mean().item(), abs=1e-6)
    assert 0 < metrics["mismatch/capped_frac"] < 1


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_the_correction_changes_the_loss_only_when_sampler_and_learner_differ(rollouts, mode):
    options = {"sampler_correction": mode, "sampler_correction_cap": 3.0}
    same_on, same_off = update(rollouts[1.0], **options), update(rollouts[1.0])
    assert same_on["loss/policy"] == pytest.approx(same_off["loss/policy"], abs=1e-4)
    perturbed_on, perturbed_off = update(rollouts[2.0], **options), update(rollouts[2.0])
    assert abs(perturbed_on["loss/policy"] - perturbed_off["loss/policy"]) > 1e-3


def test_the_numbers_docs_algorithms_quotes_are_what_its_snippet_prints(capsys):
    page = (Path(__file__).resolve().parents[2] / "docs" / "algorithms.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    exec(compile(snippet, "docs/algorithms.md", "exec"), {})
    lines = re.findall(r"^([\d.]+) (\{.*\})$", capsys.readouterr().out, re.M)
    printed = {float(temperature): ast.literal_eval(metrics) for temperature, metrics in lines}
    quoted = re.search(r"mean ([\d.]+), max ([\d.]+) nats, KL ([\d.]+), ESS ([\d.]+)", page).groups()
    keys = ["abs_log_ratio_mean", "abs_log_ratio_max", "kl", "ess"]
    assert [round(printed[2.0][f"mismatch/{key}"], 2) for key in keys] == [float(q) for q in quoted]
    assert [printed[1.0][f"mismatch/{key}"] for key in keys] == [0.0, 0.0, 0.0, 1.0]  # "all four are 0 (ESS 1)"
