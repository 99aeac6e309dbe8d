"""03 - The return and the discount gamma: V_t = R_t + gamma * V_{t+1}.

The agent does not maximise the reward of one step but the return, the sum of
the rewards still to come, each step further away weighted by one more factor of
gamma: G_t = r_t + gamma * G_{t+1}, with G = 0 after the last step. For a language
model the big reward (the score) arrives at the last token, so gamma decides how
much of it an early token is credited with. agents.ppo uses gamma = 1 (PPOConfig).

The library has no separate "returns" function: compute_gae with values = 0 and
lambda = 1 gives exactly the discounted return (its advantage is then G_t - 0).
This script prints the hand recursion next to it.

Run:  python examples/03_returns_and_discount.py [--out DIR] [--seed N]
Writes: DIR/03_returns_and_discount.json, DIR/03_returns_and_discount.png.
"""

from dataclasses import dataclass

import torch
from common import (
    ExampleArgs,
    make_env,
    parse_args,
    print_table,
    rollout,
    save_figure,
    save_json,
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure

from agents.advantages import compute_gae
from agents.ppo import PPOConfig

GAMMAS = (1.0, 0.95, 0.8, 0.5)


@dataclass
class Args(ExampleArgs):
    episode: int = 0
    """Which episode of the batch to show."""


args = parse_args(Args, __doc__)
agent, tok = warm_agent(args.out), tokenizer()
batch = rollout(agent, make_env(8), args.seed)  # 8 episodes; rewards (8, T), mask (8, T)
row = args.episode
steps = int(batch.mask[row].sum())
rewards = batch.rewards[row, :steps].tolist()  # r_0 .. r_{T-1} of one episode
print(f"prompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}  ({steps} tokens)")
print(f"agents.ppo uses gamma = {PPOConfig().gamma}")

returns_hand, returns_library = {}, {}
for gamma in GAMMAS:
    # by hand: G_t = r_t + gamma * G_{t+1}, G_T = 0
    g, out = 0.0, []
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    returns_hand[gamma] = out[::-1]
    # the library: GAE with V = 0 and lambda = 1 is the discounted return
    zeros = torch.zeros_like(batch.rewards)
    _, returns = compute_gae(batch.rewards, zeros, zeros, batch.terminated_steps, batch.mask, gamma, lam=1.0)
    returns_library[gamma] = returns[row, :steps].tolist()
    diff = max(abs(a - b) for a, b in zip(returns_hand[gamma], returns_library[gamma]))
    print(f"gamma = {gamma}: max |hand - compute_gae| = {diff:.1e}")

tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "reward": rewards[t], **{f"G(gamma={g})": returns_hand[g][t] for g in GAMMAS}}
    for t in range(steps)
]
print_table(table, "rewards and returns G_t of one episode")
print("\nWith gamma = 1, G_0 is the whole episode's reward: score - beta * (sum of per-token KL).")
save_json(
    args.out,
    "03_returns_and_discount.json",
    {
        "prompt": batch.prompts[row],
        "tokens": tokens,
        "rewards": rewards,
        "terminated": bool(batch.terminated[row]),
        "gammas": list(GAMMAS),
        "returns_hand": [returns_hand[g] for g in GAMMAS],
        "returns_library": [returns_library[g] for g in GAMMAS],
    },
)

fig = Figure(figsize=(max(7, 0.6 * steps), 4.2))
ax = fig.subplots()
ax.bar(range(steps), rewards, color="lightgrey", edgecolor="grey", label="reward r_t")
for gamma in GAMMAS:
    ax.plot(range(steps), returns_hand[gamma], "o-", label=f"return G_t, gamma = {gamma}")
ax.axhline(0, color="grey", lw=0.8)
ax.set_xticks(range(steps), tokens, rotation=60)
ax.set_xlabel("step t (the token chosen at t)")
ax.set_ylabel("reward / return")
ax.set_title(f"G_t = r_t + gamma * G_(t+1): how much of the final score reaches early tokens\n{batch.prompts[row]!r}")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
save_figure(fig, args.out, "03_returns_and_discount.png")
