"""The examples in examples/ run, and the numbers they print are consistent.

Each example runs in this process, as ``python examples/<script>`` would run it (the
way examples/walkthrough.py runs them), with its smallest settings, all into one output
directory (so the warm agent they share is trained once). The checks read the JSON
each example writes and recompute its table independently: rewards from the KL
term and the score, returns and GAE with a hand-written recursion, TD errors,
clipped objectives and losses; and they check that the figures are real PNGs.

The last examples of the walk, 13 (what goes wrong), 14 (PPO, RLOO, GRPO) and 15 (several turns), are checked
the same way: the three advantages of one batch by hand, and the gallery's runs against what each panel claims.
"""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOL = 1e-4


@pytest.fixture
def out(examples_out):
    return examples_out


def run(out: Path, script: str, *extra: str) -> None:
    """Run examples/<script> in this process, as ``python examples/<script> --out OUT <extra>`` would."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(EXAMPLES / script), "--out", str(out), *extra])
        patch.syspath_prepend(str(EXAMPLES))  # the examples import their shared helpers as `common`
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


MAX_WIDTH = 1600  # pixels: a figure a laptop shows whole


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"
    width = int.from_bytes(data[16:20], "big")  # IHDR, the first chunk: width, then height
    assert width <= MAX_WIDTH, f"{path} is {width} px wide (at most {MAX_WIDTH})"


def close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def discounted(rewards: list[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma * G_{t+1}, G = 0 after the last step."""
    g, out = 0.0, []
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    return out[::-1]


def gae(rewards, values, next_values, terminated, gamma, lam) -> tuple[list[float], list[float]]:
    """(TD errors, advantages) of one episode, by the textbook recursion."""
    deltas = [r + gamma * nv * (0.0 if term else 1.0) - v for r, v, nv, term in zip(rewards, values, next_values,
                                                                                    terminated)]  # fmt: skip
    a, advantages = 0.0, []
    for d in reversed(deltas):
        a = d + gamma * lam * a
        advantages.append(a)
    return deltas, advantages[::-1]


def test_01_agent_env_loop(out):
    run(out, "01_agent_env_loop.py")
    data = load(out, "01_agent_env_loop.json")
    turns = data["turns"]
    assert turns and all(not (t["terminated"] or t["truncated"]) for t in turns[:-1])
    assert turns[-1]["terminated"] != turns[-1]["truncated"]
    for i, turn in enumerate(turns):
        assert turn["newest_obs_token"] == turn["action"]  # the action enters the observation at index -1
        assert turn["context_tokens"] == turns[0]["context_tokens"] + i
        assert close(turn["return_so_far"], sum(t["reward"] for t in turns[: i + 1]))
    # the actor is the reference model, so the KL term is 0: only the score, on the last step
    assert all(abs(t["reward"]) < 1e-5 for t in turns[:-1])
    assert close(turns[-1]["reward"], data["score"])
    assert_png(out / "01_agent_env_loop.png")


def test_02_state_action_reward(out):
    run(out, "02_state_action_reward.py")
    data = load(out, "02_state_action_reward.json")
    beta, steps = data["kl_coef"], data["steps"]
    for i, step in enumerate(steps):
        assert close(step["-beta*kl"], -beta * step["kl"])
        last = i == len(steps) - 1
        assert (step["score"] != 0.0) == last
        assert close(step["reward"], -beta * step["kl"] + (step["score"] if last else 0.0))
        assert step["next_newest_token"] == step["action"]
        if not last:  # s_{t+1} = s_t followed by a_t
            assert steps[i + 1]["state_ids"] == step["state_ids"] + [step["action"]]
    assert_png(out / "02_observation_window.png")


def test_03_returns_and_discount(out):
    run(out, "03_returns_and_discount.py")
    data = load(out, "03_returns_and_discount.json")
    rewards = data["rewards"]
    for gamma, hand, library in zip(data["gammas"], data["returns_hand"], data["returns_library"]):
        expected = discounted(rewards, gamma)
        assert all(close(a, b) for a, b in zip(hand, expected))
        assert all(close(a, b) for a, b in zip(library, expected))
    assert close(data["returns_hand"][data["gammas"].index(1.0)][0], sum(rewards))
    assert_png(out / "03_returns_and_discount.png")


def test_04_four_roles(out):
    run(out, "04_four_roles.py")
    data = load(out, "04_four_roles.json")
    roles = {r["role"]: r for r in data["roles"]}
    for trained in ("actor (policy LM)", "critic (value head)"):
        r = roles[trained]
        assert r["requires_grad"] == r["grad_not_None"] == r["grad_nonzero"] == r["changed_by_update"] == r["tensors"]
    for frozen in ("reference model", "reward model"):
        r = roles[frozen]
        assert r["tensors"] > 0
        assert r["requires_grad"] == r["grad_not_None"] == r["grad_nonzero"] == r["changed_by_update"] == 0
    per_loss = data["grad_norm_per_loss"]
    assert per_loss["actor loss only"]["value_head"] == 0.0  # the actor loss never reaches the value head
    assert per_loss["critic loss only"]["value_head"] > 0.0
    # the value head reads block 0's output (the middle of 2 blocks): the critic loss reaches block 0, not block 1
    assert per_loss["actor loss only"]["trunk block 0"] > 0 and per_loss["critic loss only"]["trunk block 0"] > 0
    assert per_loss["actor loss only"]["trunk block 1"] > 0 and per_loss["critic loss only"]["trunk block 1"] == 0
    assert_png(out / "04_four_roles.png")
    assert_png(out / "04_four_models.png")  # the diagram of the four models and one iteration


def test_four_models_diagram_is_in_both_concept_docs():
    """The committed copy exists, is drawn by examples/four_models.py, and both concept docs show it."""
    root = EXAMPLES.parent
    assert_png(root / "docs" / "figures" / "04_four_models.png")
    for doc in ("concepts.md", "concepts.zh.md"):
        assert "](figures/04_four_models.png)" in (root / "docs" / doc).read_text(), doc
    assert "docs/figures" in (EXAMPLES / "four_models.py").read_text()


def test_05_kl_penalty(out):
    run(out, "05_kl_penalty.py", "--episodes", "6")
    data = load(out, "05_kl_penalty.json")
    beta, rows = data["kl_coef"], data["tokens"]
    for i, row in enumerate(rows):
        assert close(row["kl"], row["log_pi"] - row["log_pi_ref"])
        assert close(row["log_pi_ref"], row["log_pi_ref_recomputed"])  # the env's cached forward = a plain one
        assert close(row["-beta*kl"], -beta * row["kl"])
        score = data["score"] if i == len(rows) - 1 else 0.0
        assert close(row["reward"], -beta * row["kl"] + score)
    assert close(data["batch_sequence_kl"][0], sum(r["kl"] for r in rows))
    assert close(data["batch_exact_sequence_kl"][0], sum(r["exact_kl"] for r in rows))
    # the sampled estimate can be negative, per token and per response; the exact KL never is
    assert data["negative_sequences"] == sum(k < 0 for k in data["batch_sequence_kl"])
    assert all(k >= -1e-5 for k in data["all_exact_kl"]) and any(k < 0 for k in data["all_kl"])
    assert all(k >= -1e-5 for k in data["batch_exact_sequence_kl"])
    assert_png(out / "05_kl_per_token.png")
    assert_png(out / "05_kl_heatmap.png")
    assert_png(out / "05_kl_per_response.png")


def test_06_value_head(out):
    run(out, "06_value_head.py", "--episodes", "6", "--fit-episodes", "32")
    data = load(out, "06_value_head.json")
    rows = data["tokens"]
    for row in rows:
        assert row["V_untrained"] == 0.0  # the value head is zero-initialised
        assert close(row["V(s_t)"], row["V_by_hand"])  # value_head(the hidden state of the block it reads)
    assert all(close(r["G_t"], g) for r, g in zip(rows, discounted([r["reward"] for r in rows], 1.0)))
    assert all(math.isfinite(v) for v in data["explained_variance"].values())
    assert_png(out / "06_value_head.png")


def test_07_reward_on_last_token(out):
    run(out, "07_reward_on_last_token.py", "--episodes", "6")
    data = load(out, "07_reward_on_last_token.json")
    beta, rows = data["kl_coef"], data["tokens"]
    assert close(data["score"], data["score_recomputed"])
    for i, row in enumerate(rows):
        last = i == len(rows) - 1
        assert close(row["-beta*kl"], -beta * row["kl"])
        assert close(row["score_term"], data["score"] if last else 0.0)
        assert close(row["reward"], -beta * row["kl"] + row["score_term"])
    assert close(rows[-1]["rm_score_of_prefix"], data["score"])  # the last prefix is the whole response
    assert_png(out / "07_prefix_scores.png")
    assert_png(out / "07_reward_heatmap.png")


def test_08_actor_loss(out):
    run(out, "08_actor_loss.py", "--episodes", "8", "--samples", "64")
    data = load(out, "08_actor_loss.json")
    every, rows = data["all"], data["tokens"]
    assert data["grad_max"] > 0
    assert data["grad_max_difference"] <= 1e-6 * data["grad_max"]  # same gradient as -mean(A log pi) at ratio 1
    assert abs(data["loss_ppo"] + sum(every["advantages"]) / len(every["advantages"])) < 1e-5  # -mean(A) at ratio 1
    for a, g, v in zip(every["advantages"], every["returns"], every["values"]):
        assert close(a, g - v)  # actual minus predicted
    # the table's episode: G_t recomputed from the rewards (the score on the last token, KL terms before)
    assert all(close(r["A_t"], r["G_t"] - r["V_t"]) for r in rows)
    up = sum(c > 0 for c in every["change_naive"]) / len(every["change_naive"])
    assert close(up, data["up_fraction_naive"])
    agree = sum((a > 0) == (c > 0) for a, c in zip(every["advantages"], every["change_advantage"]))
    assert close(agree / len(every["advantages"]), data["sign_agreement"])
    gain = sum(a * c for a, c in zip(every["advantages"], every["change_advantage"])) / len(every["advantages"])
    assert close(gain, data["mean_advantage_times_change"]) and gain > 0  # the step lowered the loss
    # the three steps' shares, recomputed: tokens that rose, and those of negatively scored responses
    negative = [s < 0 for s in every["score"]]
    for name, key in (("naive", "change_naive"), ("reinforce", "change_reinforce"), ("advantage", "change_advantage")):
        rose = [c > 0 for c in every[key]]
        assert close(data[name]["share_rising"], sum(rose) / len(rose))
        if any(negative):  # (a small batch may have no negatively scored response: then the share is NaN)
            share = sum(r for r, n in zip(rose, negative) if n) / sum(negative)
            assert close(data[name]["share_rising_negative"], share)
    for example in (data["example"], data["negative_example"]):
        assert close(example["A_0"], example["G_0"] - example["V_0"])
        assert close(example["kl_terms"], example["G_0"] - example["score"])
    assert data["negative_example"]["score"] == min(every["score"])
    # the baseline on one state: the exact expectation of grad log pi is 0, and a state-only weight's sample mean
    # is of the size of its sampling noise, while G's stands above its own
    baseline = data["baseline"]
    assert baseline["exact_expectation_norm"] < 1e-5
    norms, noise = baseline["mean_gradient_norm"], baseline["noise_level"]
    assert norms["V(s_0)"] < 3 * noise["V(s_0)"] and norms["mean G"] < 3 * noise["mean G"]
    assert close(baseline["one_sample_spread"]["G"] / baseline["samples"] ** 0.5, noise["G"])
    assert baseline["curve"]["n"][-1] == baseline["samples"]
    assert_png(out / "08_actor_loss.png")


def test_09_advantages_gae(out):
    run(out, "09_advantages_gae.py", "--episodes", "6")
    data = load(out, "09_advantages_gae.json")
    gamma, lam, rows = data["gamma"], data["lam"], data["tokens"]
    values = [r["value"] for r in rows]
    next_values = values[1:] + [data["value_after_last"]]
    terminated = [False] * (len(rows) - 1) + [data["terminated"]]
    rewards = [r["reward"] for r in rows]
    deltas, advantages = gae(rewards, values, next_values, terminated, gamma, lam)
    _, monte_carlo = gae(rewards, values, next_values, terminated, gamma, 1.0)
    for row, delta, advantage, mc, g in zip(rows, deltas, advantages, monte_carlo, discounted(rewards, gamma)):
        assert close(row["log_pi_ref"], row["log_pi"] - row["kl"])
        assert close(row["td_error"], delta)
        assert close(row["advantage"], advantage)
        assert close(row["return"], advantage + row["value"])
        assert close(row["G-V (lam=1)"], mc)
        if data["terminated"]:
            assert close(mc, g - row["value"])  # lambda = 1: actual minus predicted return
    batch = data["batch"]  # every episode of the batch, and the whitening
    whitened = []
    for b, mask in enumerate(batch["mask"]):
        n = sum(mask)
        v = batch["values"][b]
        term = batch["terminated_steps"][b][:n]
        _, expected = gae(batch["rewards"][b][:n], v[:n], v[1 : n + 1], term, gamma, lam)
        assert all(close(a, e) for a, e in zip(batch["advantages"][b][:n], expected))
        assert all(a == 0.0 for a in batch["advantages"][b][n:])
        whitened += batch["whitened"][b][:n]
    mean = sum(whitened) / len(whitened)
    std = math.sqrt(sum((w - mean) ** 2 for w in whitened) / (len(whitened) - 1))
    assert abs(mean) < 1e-5 and abs(std - 1) < 1e-3
    assert_png(out / "09_advantage_heatmap.png")
    assert_png(out / "09_gae_episode.png")


def test_10_ppo_ratio_clipping(out):
    run(out, "10_ppo_ratio_clipping.py", "--episodes", "16")
    data = load(out, "10_ppo_ratio_clipping.json")
    eps, every = data["clip_range"], data["all"]
    objectives, clipped = [], []
    for r, a, objective, flag in zip(every["ratio"], every["advantage"], every["objective"], every["clipped"]):
        unclipped, clipped_term = r * a, min(max(r, 1 - eps), 1 + eps) * a
        assert close(objective, min(unclipped, clipped_term))
        assert flag == (clipped_term < unclipped)
        if flag:  # clipped only outside [1 - eps, 1 + eps], on the side the advantage pushes towards
            assert (r > 1 + eps and a > 0) or (r < 1 - eps and a < 0)
        objectives.append(objective)
        clipped.append(flag)
    assert close(data["policy_loss"], -sum(objectives) / len(objectives))
    assert close(data["clipfrac"], sum(clipped) / len(clipped))
    for row in data["tokens"]:
        assert close(row["rho*A"], row["ratio"] * row["advantage"])
        assert close(row["objective"], min(row["rho*A"], row["clip(rho)*A"]))
    # approx_kl = mean((rho - 1) - log rho) over the tokens, recomputed from the ratios
    ratios = every["ratio"]
    assert close(data["approx_kl"], sum((r - 1) - math.log(r) for r in ratios) / len(ratios), 1e-3)
    # the typical update (warm optimizer) moves the policy less than the atypical one (fresh optimizer)
    fresh = data["fresh_optimizer"]
    assert data["update_metrics"]["ppo/approx_kl"] < fresh["update_metrics"]["ppo/approx_kl"]
    assert data["lr"] < fresh["lr"]
    assert_png(out / "10_ppo_ratio_clipping.png")


def test_11_critic_loss(out):
    run(out, "11_critic_loss.py", "--episodes", "16")
    data = load(out, "11_critic_loss.json")
    eps, every = data["clip_range_value"], data["all"]
    terms = []
    for old, new, target, flag in zip(every["V_old"], every["V_new"], every["return"], every["clipped"]):
        v_clip = old + min(max(new - old, -eps), eps)
        unclipped, clipped = (new - target) ** 2, (v_clip - target) ** 2
        terms.append(0.5 * max(unclipped, clipped))
        # float32 may round V_old + (V - V_old) to a neighbour of V: such a tie is not counted as clipped
        assert flag == ((clipped > unclipped) and abs(new - old) > eps) or abs(clipped - unclipped) < 1e-5
        if flag:  # a real clip happens only outside V_old +- eps
            assert abs(new - old) > eps
    assert close(data["value_loss"], sum(terms) / len(terms))
    assert close(data["value_clipfrac"], sum(every["clipped"]) / len(every["clipped"]))
    # the typical update (a run's Adam) moves the values less than the atypical one (a fresh Adam)
    fresh = data["fresh_optimizer"]
    assert data["moved"]["max"] < fresh["moved"]["max"] and data["lr"] < fresh["lr"]
    moved = [abs(new - old) for new, old in zip(every["V_new"], every["V_old"])]
    assert close(data["moved"]["max"], max(moved))
    for row in data["tokens"]:
        assert close(row["V_clipped"], row["V_old"] + min(max(row["V_new"] - row["V_old"], -eps), eps))
        assert close(row["(V-R)^2"], (row["V_new"] - row["return"]) ** 2)
        assert close(row["(Vclip-R)^2"], (row["V_clipped"] - row["return"]) ** 2)
        assert close(row["loss_term"], 0.5 * max(row["(V-R)^2"], row["(Vclip-R)^2"]))
    assert_png(out / "11_critic_loss.png")


def test_12_train_end_to_end(out):
    run(out, "12_train_end_to_end.py", "--iterations", "3", "--batch-size", "8", "--eval-episodes", "8",
        "--samples", "2")  # fmt: skip
    data = load(out, "12_train_end_to_end.json")
    samples = data["samples"]
    assert len(samples) == 8 and all(s["before"] and s["after"] for s in samples)
    assert close(data["positive_before"], sum(s["before_score"] > 0 for s in samples) / 8)
    assert close(data["positive_after"], sum(s["after_score"] > 0 for s in samples) / 8)
    assert close(data["score_after"], sum(s["after_score"] for s in samples) / 8)
    train_rows = [m for m in data["metrics"] if "env/score" in m]
    assert [m["iteration"] for m in train_rows] == [0, 1, 2]
    for m in train_rows:  # the panels of the learning curve are all logged
        for key in ("ppo/explained_variance", "ppo/approx_kl", "ppo/clipfrac", "kl/coef", "loss/value"):
            assert math.isfinite(m[key]), key
    # beta follows the adaptive controller: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * episodes / horizon
    for before, after in zip(train_rows, train_rows[1:]):
        error = min(max(before["env/kl"] / data["kl_target"] - 1, -0.2), 0.2)
        assert close(after["kl/coef"], before["kl/coef"] * (1 + error * data["batch_size"] / data["kl_horizon"]))
    assert (out / "12_run" / "final" / "model.safetensors").exists()
    assert_png(out / "12_learning_curve.png")
    assert_png(out / "12_scores_before_after.png")


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
                         "EOS penalty 1 (10 tokens)", "starved critic", "separate critic"}  # fmt: skip
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
