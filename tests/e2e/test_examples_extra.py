"""The last examples of the walk: 13 (what goes wrong), 14 (PPO, RLOO, GRPO) and 15 (several turns).

As in test_examples.py, each example runs in this process and the checks recompute
its numbers from the JSON it writes: the three advantages of one batch by hand,
and the gallery's runs against what each panel claims.
"""

import math

import pytest

from tests.e2e.test_examples import assert_png, close, gae, load, run


@pytest.fixture
def out(examples_out):
    return examples_out


def test_14_ppo_grpo_rloo(out):
    run(out, "14_ppo_grpo_rloo.py", "--prompts", "3", "--group-size", "3")
    data = load(out, "14_ppo_grpo_rloo.json")
    k, gamma, lam = data["group_size"], data["gamma"], data["lam"]
    mask, rewards, values = data["mask"], data["rewards"], data["values"]
    advantages = data["advantages"]
    returns = [sum(r for r, m in zip(rewards[b], mask[b]) if m) for b in range(len(mask))]
    for b, row in enumerate(data["rows"]):
        n = sum(mask[b])
        assert close(row["R_i"], returns[b])
        # PPO: GAE against the critic, per token
        _, expected = gae(rewards[b][:n], values[b][:n], values[b][1 : n + 1], data["terminated_steps"][b][:n],
                          gamma, lam)  # fmt: skip
        assert all(close(a, e) for a, e in zip(advantages["ppo"][b][:n], expected))
        # RLOO and GRPO: one value for the whole response, from its group of k
        group = returns[(b // k) * k : (b // k + 1) * k]
        others = (sum(group) - returns[b]) / (k - 1)
        mean = sum(group) / k
        std = math.sqrt(sum((g - mean) ** 2 for g in group) / (k - 1))
        assert all(close(a, returns[b] - others) for a in advantages["rloo"][b][:n])
        assert all(close(a, (returns[b] - mean) / (std + 1e-4), 1e-3) for a in advantages["grpo"][b][:n])
        for algo in advantages:
            assert all(a == 0.0 for a in advantages[algo][b][n:])
    for g in range(len(mask) // k):  # within a group, RLOO and GRPO advantages sum to 0
        assert abs(sum(advantages["rloo"][b][0] for b in range(g * k, g * k + k))) < 1e-4
        assert abs(sum(advantages["grpo"][b][0] for b in range(g * k, g * k + k))) < 1e-3
    assert_png(out / "14_ppo_grpo_rloo.png")


@pytest.mark.slow
def test_13_what_goes_wrong(out):
    run(out, "13_what_goes_wrong.py", "--quick")
    data = load(out, "13_what_goes_wrong.json")
    runs = data["runs"]
    assert set(runs) == {"baseline", "no KL penalty", "too large a step", "no EOS penalty (10 tokens)",
                         "EOS penalty 1 (10 tokens)", "separate critic"}  # fmt: skip
    for name, result in runs.items():
        metrics = result["metrics"]
        assert [m["iteration"] for m in metrics] == list(range(data["iterations"])), name
        for m in metrics:
            assert 0.0 <= m["env/eos_rate"] <= 1.0 and m["ppo/approx_kl"] >= 0.0
        for sample in result["last_samples"]:
            assert math.isfinite(sample["score"])
        for key, summary in result["summary"].items():  # what the docs quote: first, last, min, max of each metric
            points = [m[key] for m in metrics if key in m]
            assert (summary["first"], summary["last"]) == (points[0], points[-1]), (name, key)
            assert (summary["min"], summary["max"]) == (min(points), max(points)), (name, key)
    # the no-KL run pays no KL penalty: its non-score reward is 0; the baseline's is -beta * KL
    for m in runs["no KL penalty"]["metrics"]:
        assert m["kl/coef"] == 0.0 and m["env/non_score_reward"] == 0.0
    for m in runs["baseline"]["metrics"]:
        assert close(m["env/non_score_reward"], -m["kl/coef"] * m["env/kl"])
    # responses are cut at 10 tokens in the EOS runs
    for name in ("no EOS penalty (10 tokens)", "EOS penalty 1 (10 tokens)"):
        assert all(m["env/response_length"] <= 10 for m in runs[name]["metrics"])
    probes = {p["what"]: p["score"] for p in data["probes"]}
    assert probes["a plain positive review"] > 0 > probes["a plain negative review"]
    assert_png(out / "13_what_goes_wrong.png")


def test_15_multi_turn(out):
    run(out, "15_multi_turn.py", "--iterations", "2", "--episodes", "16")
    data = load(out, "15_multi_turn.json")
    assert_png(out / "15_multi_turn.png")
    tokens = data["tokens"]
    agent = [t for t in tokens if t["whose"] == "agent"]
    calculator = [t for t in tokens if t["whose"] == "calculator"]
    # the calculator's tokens are context only: no reward, KL, value or advantage of their own
    assert all(t[key] is None for t in calculator for key in ("reward", "kl", "value", "advantage"))
    if calculator:  # the episode called the tool: '?', EOS, then the reply, then the answer
        assert [t["token"] for t in tokens[:2]] == ["?", "<eos>"] and calculator[-1]["token"] == ":"
    # each agent reward is the KL penalty, plus the score on the last step (no turn rewards in this task)
    for t in agent[:-1]:
        assert close(t["reward"], -data["kl_coef"] * t["kl"])
    assert close(agent[-1]["reward"], -data["kl_coef"] * agent[-1]["kl"] + data["score"])
    # GAE over the agent's steps only, the environment's tokens skipped, bootstrapped if truncated
    rewards, values = [t["reward"] for t in agent], [t["value"] for t in agent]
    next_values = values[1:] + [data["bootstrap_value"]]
    terminated = [False] * (len(agent) - 1) + [data["terminated"]]
    _, expected = gae(rewards, values, next_values, terminated, data["gamma"], data["lam"])
    assert all(close(t["advantage"], e) for t, e in zip(agent, expected))
    assert all(close(t["return"], t["advantage"] + t["value"]) for t in agent)
    assert (data["agent_steps"], data["calculator_tokens"]) == (len(agent), len(calculator))
    assert data["called"] == round(data["called_rate"] * data["episodes"])
