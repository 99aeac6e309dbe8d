"""Recipes by name (agents.ppo.RECIPES) and the losses they select, against their papers' formulas.

1. Each surrogate on one small batch against the published formula written out here in plain Python (math.exp,
   lists): clip-higher (DAPO), dual-clip PPO, GSPO's sequence ratio (value and gradient), CISPO's detached weight
   (value and gradient); the update's loss (micro_batch_loss) under each recipe equals its paper's objective.
2. Advantages as each recipe computes them from a hand-made rollout: GRPO, Dr. GRPO (no std division, no whitening),
   REINFORCE++ (reward-to-go whitened over the batch).
3. Settings: what each recipe sets, conflicts refused naming both settings (in Python and on the command line), the
   defaults unchanged, and advantage_scaling 'none' no longer whitened; a recipe without KL trains with none in
   the reward and logs the sampler's mismatch.
"""

import math

import pytest
import torch

from agents.losses import policy_loss
from agents.ppo import RECIPES, PPOConfig, Scored, Targets, micro_batch_loss, rollout_advantages
from agents.train import TrainConfig, Trainer, cli
from tests.agents.test_ppo import tiny_rollout

# two sequences: three valid tokens, then two and a padding step
LOGPROBS = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
OLD = [[-1.2, -0.5, -1.5], [-0.3, -0.9, 0.0]]
ADVANTAGES = [[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]]
MASK = [[True, True, True], [True, True, False]]


def tensors(logprobs=LOGPROBS, old=OLD, advantages=ADVANTAGES, mask=MASK, grad=False):
    new = torch.tensor(logprobs, dtype=torch.float64, requires_grad=grad)
    return (
        new,
        torch.tensor(old, dtype=torch.float64),
        torch.tensor(advantages, dtype=torch.float64),
        torch.tensor(mask),
    )


def valid(mask):
    """The (row, column) of each valid token."""
    return [(i, t) for i, row in enumerate(mask) for t, ok in enumerate(row) if ok]


def ppo_token_loss(r: float, a: float, low: float, high: float) -> float:
    return max(-a * r, -a * min(max(r, 1 - low), 1 + high))


# --------------------------------------------------------------------------- surrogates, hand values
def test_clip_higher_is_dapos_asymmetric_clip_token_mean():
    new, old, adv, mask = tensors()
    loss, stats = policy_loss(new, old, adv, mask, 0.2, clip_range_high=0.28, aggregation="token_mean")
    # exp(0.2) = 1.2214 lies inside 1 + 0.28 (kept) but beyond 1 + 0.2: the symmetric clip would cut it to 1.2
    terms = [ppo_token_loss(math.exp(LOGPROBS[i][t] - OLD[i][t]), ADVANTAGES[i][t], 0.2, 0.28) for i, t in valid(MASK)]
    assert loss.item() == pytest.approx(sum(terms) / 5)
    symmetric, _ = policy_loss(new, old, adv, mask, 0.2, aggregation="token_mean")
    assert symmetric.item() == pytest.approx((-1.2 - 1.0 - math.exp(-0.5) + 2.0 + 2 * 0.8) / 5)
    assert stats["ppo/clipfrac"].item() == pytest.approx(1 / 5)  # the A < 0 token at r = exp(-0.3) < 0.8


def test_dual_clip_bounds_the_loss_of_negative_advantages_by_c_times_minus_a():
    # row 1, token 0: r = exp(1.5) = 4.48 with A = -2: PPO's loss max(8.96, 2.4) = 8.96, dual-clip's min(8.96, 6) = 6
    logprobs, old = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]], [[-1.2, -0.5, -1.5], [-1.8, -0.9, 0.0]]
    new, old_t, adv, mask = tensors(logprobs, old)
    loss, stats = policy_loss(new, old_t, adv, mask, 0.2, dual_clip_c=3.0)
    plain, _ = policy_loss(new, old_t, adv, mask, 0.2)
    expected = []
    for i, t in valid(MASK):
        a, term = ADVANTAGES[i][t], ppo_token_loss(math.exp(logprobs[i][t] - old[i][t]), ADVANTAGES[i][t], 0.2, 0.2)
        expected.append(min(term, -3.0 * a) if a < 0 else term)
    assert expected[3] == 6.0
    assert loss.item() == pytest.approx(sum(expected) / 5)
    assert plain.item() - loss.item() == pytest.approx((2 * math.exp(1.5) - 6.0) / 5)
    # decided by a clip: r = exp(0.2) > 1.2 (A > 0), r = exp(-0.3) < 0.8 (A < 0), and the dual bound
    assert stats["ppo/clipfrac"].item() == pytest.approx(3 / 5)


def test_gspo_ratio_is_the_length_normalised_sequence_ratio_clipped_per_sequence():
    # log-ratios: row 0 mean (0.2 + 0 + 0.2) / 3, beyond 1 + 4e-4 with A > 0: clipped; row 1 mean (0 + 3e-4) / 2,
    # inside [1 - 3e-4, 1 + 4e-4]
    logprobs = [[-1.0, -0.5, -1.3], [-0.3, -0.8997, 0.0]]
    new, old, adv, mask = tensors(logprobs, grad=True)
    loss, _ = policy_loss(
        new, old, adv, mask, 3e-4, clip_range_high=4e-4, level="sequence", aggregation="sequence_mean"
    )
    s0, s1 = math.exp(0.4 / 3), math.exp(1.5e-4)
    per_sequence = [ppo_token_loss(s0, 1.0, 3e-4, 4e-4), ppo_token_loss(s1, -2.0, 3e-4, 4e-4)]
    assert per_sequence == [pytest.approx(-(1 + 4e-4)), pytest.approx(2 * s1)]
    assert loss.item() == pytest.approx(sum(per_sequence) / 2)
    loss.backward()
    # row 0: the clip decides (a constant): no gradient; row 1: d(-A s1) / d logp_t = -A s1 / |y| / G, |y| = G = 2
    expected = [[0.0, 0.0, 0.0], [2.0 * s1 / 4, 2.0 * s1 / 4, 0.0]]
    torch.testing.assert_close(new.grad, torch.tensor(expected, dtype=torch.float64))


def test_cispo_weights_log_pi_by_the_clipped_detached_ratio_and_keeps_every_tokens_gradient():
    # row 0, token 0: r = exp(0.4) = 1.49 > 1.28 with A > 0: PPO's clip would zero its gradient, CISPO's keeps it
    logprobs = [[-0.8, -0.5, -2.0], [-0.3, -1.2, 0.0]]
    new, old, adv, mask = tensors(logprobs, grad=True)
    loss, stats = policy_loss(new, old, adv, mask, 0.2, clip_range_high=0.28, surrogate="cispo")
    weights = {(i, t): min(math.exp(logprobs[i][t] - OLD[i][t]), 1.28) for i, t in valid(MASK)}
    assert weights[0, 0] == 1.28 and weights[1, 1] == pytest.approx(math.exp(-0.3))  # no lower bound
    expected = sum(-w * ADVANTAGES[i][t] * logprobs[i][t] for (i, t), w in weights.items()) / 5
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    grad = [[0.0] * 3 for _ in range(2)]
    for (i, t), w in weights.items():
        grad[i][t] = -w * ADVANTAGES[i][t] / 5  # the weight has no gradient: d/d log pi of -w A log pi
    torch.testing.assert_close(new.grad, torch.tensor(grad, dtype=torch.float64))
    assert stats["ppo/clipfrac"].item() == pytest.approx(1 / 5)


def test_sampler_weights_multiply_each_tokens_loss_before_aggregation():
    new, old, adv, mask = tensors()
    weights = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.0, 9.0]], dtype=torch.float64)
    loss, _ = policy_loss(new, old, adv, mask, 0.2, weights=weights, aggregation="sequence_mean")
    terms = {
        (i, t): ppo_token_loss(math.exp(LOGPROBS[i][t] - OLD[i][t]), ADVANTAGES[i][t], 0.2, 0.2) for i, t in valid(MASK)
    }
    row0 = (0.5 * terms[0, 0] + 2.0 * terms[0, 1] + 1.0 * terms[0, 2]) / 3
    row1 = (3.0 * terms[1, 0] + 0.0 * terms[1, 1]) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2)


REF = [[-1.1, -0.7, -1.8], [-0.5, -1.0, 0.0]]
BETA, L = 0.1, 4  # the KL coefficient; the constant L of Dr. GRPO (the env's max_new_tokens)


def paper_objective(recipe: str) -> float:
    """Each paper's loss on the small batch, in plain Python: per-token terms, then its own normalisation."""
    tokens = valid(MASK)
    r = {(i, t): math.exp(LOGPROBS[i][t] - OLD[i][t]) for i, t in tokens}
    a = {(i, t): ADVANTAGES[i][t] for i, t in tokens}
    rows = [[(i, t) for i, t in tokens if i == row] for row in range(2)]
    if recipe == "grpo":  # 1/G sum_i 1/|o_i| sum_t [clipped - beta k3]  (as a loss)
        k3 = {
            k: math.exp(REF[k[0]][k[1]] - LOGPROBS[k[0]][k[1]]) - 1 - (REF[k[0]][k[1]] - LOGPROBS[k[0]][k[1]])
            for k in tokens
        }
        return sum(sum(ppo_token_loss(r[k], a[k], 0.2, 0.2) + BETA * k3[k] for k in row) / len(row) for row in rows) / 2
    if recipe == "dr_grpo":  # sum over every token / (G L)
        return sum(ppo_token_loss(r[k], a[k], 0.2, 0.2) for k in tokens) / (2 * L)
    if recipe in ("dapo", "reinforce_pp", "dual_clip"):  # sum over every token / tokens
        high = 0.28 if recipe == "dapo" else 0.2
        terms = [ppo_token_loss(r[k], a[k], 0.2, high) for k in tokens]
        if recipe == "dual_clip":
            terms = [min(term, -3.0 * a[k]) if a[k] < 0 else term for term, k in zip(terms, tokens)]
        return sum(terms) / len(tokens)
    if recipe == "gspo":  # 1/G sum_i clipped(s_i), s_i = exp(mean log-ratio)
        s = [math.exp(sum(math.log(r[k]) for k in row) / len(row)) for row in rows]
        return sum(ppo_token_loss(s[i], ADVANTAGES[i][0], 3e-4, 4e-4) for i in range(2)) / 2
    assert recipe == "cispo"  # sum over every token of -min(r, 1.28) A log pi / tokens
    return sum(-min(r[k], 1.28) * a[k] * LOGPROBS[k[0]][k[1]] for k in tokens) / len(tokens)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_update_loss_under_each_recipe_is_its_papers_objective(recipe):
    new, old, adv, mask = tensors(grad=True)
    zeros = torch.zeros(2, 4, dtype=torch.float64)  # values, old values and returns: no value loss
    scored = Scored(logprobs=new, values=zeros, entropy=torch.zeros_like(new))
    ref = torch.tensor(REF, dtype=torch.float64)
    targets = Targets(old, zeros, ref, adv, zeros[:, :3], mask)
    loss, _ = micro_batch_loss(scored, targets, torch.arange(2), PPOConfig(recipe=recipe), BETA, L)
    assert loss.item() == pytest.approx(paper_objective(recipe), rel=1e-12)


# --------------------------------------------------------------------------- advantages as each recipe makes them
RETURNS = [1.0, 0.0, 0.5, 2.0]  # tiny_rollout: two groups of two, each return paid on the episode's last step


def test_grpo_recipe_divides_by_the_group_std_and_does_not_whiten():
    config = PPOConfig(recipe="grpo", group_size=2)
    advantages, _, mask = rollout_advantages(tiny_rollout(RETURNS), torch.zeros(4, 4), config, kl_coef=0.0)
    # group (1, 0): centered +-0.5, std sqrt(0.5); group (0.5, 2): centered -+0.75, std sqrt(1.125)
    a, b = 0.5 / (0.5**0.5 + 1e-4), 0.75 / (1.125**0.5 + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, -b, b])[:, None] * mask)


def test_dr_grpo_leaves_advantages_unscaled_and_unwhitened():
    for config in (
        PPOConfig(recipe="dr_grpo", group_size=2),
        PPOConfig(algo="grpo", advantage_scaling="none", group_size=2),
    ):
        advantages, _, mask = rollout_advantages(tiny_rollout(RETURNS), torch.zeros(4, 4), config, kl_coef=0.0)
        torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, -0.75, 0.75])[:, None] * mask)


def test_reinforce_pp_whitens_the_reward_to_go_over_the_batchs_tokens():
    rollout = tiny_rollout(RETURNS)
    rewards = rollout.rewards.clone()
    rewards[0, 0], rewards[3, 1] = -0.25, 0.5  # rewards before the last step: the reward-to-go sums them
    config = PPOConfig(recipe="reinforce_pp")
    advantages, _, mask = rollout_advantages(rollout._replace(rewards=rewards), torch.zeros(4, 4), config, 0.0)
    # lengths 3, 2, 1, 3 (gamma 1): reward-to-go of each step, then (x - mean) / std (unbiased) over the 9 tokens
    to_go = [[0.75, 1.0, 1.0], [0.0, 0.0], [0.5], [2.5, 2.5, 2.0]]
    flat = [x for row in to_go for x in row]
    mean = sum(flat) / 9
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 8)
    expected = torch.zeros(4, 3)
    for i, row in enumerate(to_go):
        expected[i, : len(row)] = torch.tensor([(x - mean) / math.sqrt(std**2 + 1e-8) for x in row])
    torch.testing.assert_close(advantages, expected)
    assert not config.uses_critic and not config.uses_groups


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_sets_its_fields_and_an_equal_explicit_value_is_accepted(recipe):
    config = PPOConfig(recipe=recipe)
    for name, value in RECIPES[recipe].items():
        assert getattr(config, name) == value, name
        assert getattr(PPOConfig(recipe=recipe, **{name: value}), name) == value


def test_the_published_values_of_each_recipe():
    assert (PPOConfig(recipe="dapo").clip_range, PPOConfig(recipe="dapo").clip_range_high) == (0.2, 0.28)
    assert PPOConfig(recipe="dapo").filter_equal_groups and PPOConfig(recipe="dapo").kl_penalty == "none"
    assert (PPOConfig(recipe="gspo").clip_range, PPOConfig(recipe="gspo").clip_range_high) == (3e-4, 4e-4)
    assert PPOConfig(recipe="gspo").importance_sampling_level == "sequence"
    assert PPOConfig(recipe="dual_clip").dual_clip_c == 3.0 and PPOConfig(recipe="dual_clip").algo == "ppo"
    assert PPOConfig(recipe="grpo").kl_penalty == "loss" and PPOConfig(recipe="grpo").kl_estimator == "k3"
    assert PPOConfig(recipe="dr_grpo").loss_aggregation == "constant"
    assert PPOConfig(recipe="cispo").surrogate == "cispo"
    assert (
        PPOConfig(recipe="reinforce_pp").kl_penalty == "reward" and PPOConfig(recipe="reinforce_pp").whiten_advantages
    )


@pytest.mark.parametrize(
    "options, match",
    [
        (
            {"recipe": "dapo", "clip_range_high": 0.3},
            r"recipe 'dapo' sets clip_range_high=0.28, but clip_range_high=0.3",
        ),
        ({"recipe": "dr_grpo", "algo": "rloo"}, r"recipe 'dr_grpo' sets algo='grpo', but algo='rloo'"),
        ({"recipe": "grpo", "kl_estimator": "k2"}, r"recipe 'grpo' sets kl_estimator='k3', but kl_estimator='k2'"),
        ({"recipe": "reinforce_pp", "whiten_advantages": False}, r"sets whiten_advantages=True, but .*=False"),
        ({"recipe": "cispo", "dual_clip_c": 3.0}, r"dual_clip_c"),
        ({"recipe": "paper"}, r"recipe"),
    ],
)
def test_a_setting_at_odds_with_the_recipe_is_refused_naming_both(options, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**options)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--recipe", "dr_grpo", "--whiten-advantages"], r"recipe 'dr_grpo' sets whiten_advantages=False, but"),
        (["--recipe", "dapo", "--algo", "ppo"], r"recipe 'dapo' sets algo='grpo', but --algo 'ppo'"),
        (["--recipe=gspo", "--clip-range=0.2"], r"recipe 'gspo' sets clip_range=0.0003, but --clip-range 0.2"),
        (["--algo", "grpo", "--advantage-scaling", "none", "--whiten-advantages"], r"advantage_scaling 'none'"),
    ],
)
def test_a_flag_given_at_its_default_against_the_recipe_is_refused_on_the_command_line(argv, match):
    with pytest.raises(ValueError, match=match):
        cli(argv)


def test_the_command_line_takes_a_recipe_and_flags_that_agree_with_it():
    config = cli(["--recipe", "dapo", "--clip-range-high", "0.28", "--no-whiten-advantages", "--epochs", "2"])
    assert config.ppo.recipe == "dapo" and config.ppo.clip_range_high == 0.28 and config.ppo.epochs == 2


def test_defaults_are_unchanged_and_only_unscaled_advantages_lose_their_whitening():
    default = PPOConfig()
    assert (default.algo, default.whiten_advantages, default.loss_aggregation, default.kl_penalty) == (
        "ppo",
        True,
        "token_mean",
        "reward",
    )
    assert default.surrogate == "clip" and default.importance_sampling_level == "token"
    assert default.dual_clip_c is None and default.sampler_correction is None
    assert PPOConfig(algo="rloo").whiten_advantages and PPOConfig(algo="grpo").whiten_advantages
    assert PPOConfig(algo="rloo", advantage_scaling="batch").whiten_advantages
    assert not PPOConfig(algo="rloo", advantage_scaling="none").whiten_advantages


def test_a_recipe_without_kl_trains_with_no_kl_in_the_reward_and_logs_the_mismatch(tmp_path):
    config = TrainConfig(ppo=PPOConfig(recipe="dapo", minibatch_size=8, micro_batch_size=8, epochs=1))
    config.env.max_new_tokens, config.env.kl_coef = 6, 0.5
    config.run.run_dir, config.run.progress, config.run.threads = tmp_path / "run", False, 1
    config.run.batch_size, config.run.eval_episodes, config.run.iterations = 8, 4, 1
    trainer = Trainer(config)
    try:
        metrics, rollout = trainer.iterate(1)  # no evaluation at iteration 1
    finally:
        trainer.logger.close()
    assert trainer.env.kl_coef == 0.0 and rollout.kl[rollout.mask].abs().max() > 0  # a KL measured, not charged
    last = rollout.mask & ~torch.cat([rollout.mask[:, 1:], torch.zeros_like(rollout.mask[:, :1])], 1)
    assert rollout.rewards[~last].abs().max() == 0  # only the score, on each episode's last step
    assert metrics["mismatch/abs_log_ratio_max"] < 1e-4 and metrics["mismatch/ess"] == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dual_clip_c": 1.0}, r"dual_clip_c must be > 1"),
        ({"surrogate": "cispo", "dual_clip_c": 3.0}, r"dual_clip_c bounds PPO's clipped surrogate"),
        ({"surrogate": "ratio"}, r"surrogate"),
        ({"importance_sampling_level": "batch"}, r"importance_sampling_level"),
        ({"sampler_correction": "token_clip"}, r"sampler_correction"),
        ({"sampler_correction_cap": 0.0}, r"sampler_correction_cap"),
        ({"algo": "reinforce", "advantage_scaling": "batch"}, r"not to algo 'reinforce'"),
        ({"kl_penalty": "nowhere"}, r"kl_penalty"),
    ],
)
def test_new_options_out_of_range_are_refused_naming_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**options)


def test_the_docs_recipe_table_agrees_with_its_results():
    """Each row of docs/algorithms.md's table is what benchmarks/recipes.py wrote for both tasks; every recipe
    has its row."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "algorithms.md").read_text()
    results = {
        task: json.loads((root / "docs" / "results" / "recipes" / f"{task}.json").read_text())
        for task in ("arithmetic", "calculator")
    }
    names = list(results["arithmetic"]["runs"])
    assert set(RECIPES) <= set(names) and names == list(results["calculator"]["runs"])
    for name in names:
        algo, _, settings = name.partition(" (")  # "ppo (default)", "ppo (earlier critic)", or a recipe's name
        label = f"`--algo {algo}` ({settings.rstrip(')')} settings)" if settings else f"`--recipe {name}`"
        cells = []
        for task in ("arithmetic", "calculator"):
            runs = results[task]["runs"][name]
            assert [run["seed"] for run in runs] == [0, 1, 2]
            accuracy = [100 * run["accuracy"] for run in runs]
            cells += [" / ".join(f"{a:.1f}" for a in accuracy), f"{sum(accuracy) / 3:.1f}"]
        row = f"| {label} | " + " | ".join(cells) + " |"
        assert row in text, row
