"""09 - The advantage: actual minus predicted return, estimated with GAE.

A_t = (return actually obtained from s_t after taking a_t) - V(s_t) (the return the
critic predicted). With lambda = 1 that is exactly G_t - V(s_t). GAE (Schulman et
al. 2016) blends one-step and longer estimates to lower the variance, from the
TD errors of the critic:

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * A_{t+1}          (A = 0 after the last step)
    return_t = A_t + V(s_t)                               (the critic's target, see 11)

agents.advantages.compute_gae does this; ppo_update calls it with PPOConfig's gamma
and lambda on values from score_rollout, then whitens the advantages (masked_whiten).
The script prints the per-token table and recomputes GAE by hand.

Run:  python examples/09_advantages_gae.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/09_advantages_gae.json, DIR/09_advantage_heatmap.png (batch), DIR/09_gae_episode.png (one episode).
"""

from dataclasses import dataclass

import numpy as np
import torch
from common import (
    ExampleArgs,
    make_env,
    parse_args,
    print_table,
    rollout,
    save_figure,
    save_json,
    token_heatmap,
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure

from agents.advantages import compute_gae, masked_whiten
from agents.ppo import PPOConfig, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 12
    """Episodes in the batch."""
    episode: int = 0
    """Which episode to tabulate."""


args = parse_args(Args, __doc__)
agent, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
gamma, lam = config.gamma, config.lam
env = make_env(args.episodes)
batch = rollout(agent, env, args.seed)  # rewards, kl, logprobs, mask: (B, T)
with torch.no_grad():
    values = score_rollout(agent, batch, 1.0).values  # (B, T + 1): V(s_0) .. V(s_T)
mask, terminated = batch.mask, batch.terminated_steps  # (B, T) each; terminated: True on an EOS step
advantages, returns = compute_gae(batch.rewards, values[:, :-1], values[:, 1:], terminated, mask, gamma, lam)
monte_carlo, _ = compute_gae(batch.rewards, values[:, :-1], values[:, 1:], terminated, mask, gamma, 1.0)  # G_t - V
whitened = masked_whiten(advantages, mask)

# The same by hand, one episode at a time, backwards from its last step.
td = batch.rewards + gamma * values[:, 1:] * (~terminated) - values[:, :-1]  # (B, T) TD errors
by_hand = torch.zeros_like(advantages)
for b in range(len(mask)):
    running = 0.0
    for t in reversed(range(int(mask[b].sum()))):
        running = td[b, t] + gamma * lam * running
        by_hand[b, t] = running
difference = float((by_hand - advantages).abs().max())
print(f"gamma = {gamma}, lambda = {lam}; max |hand GAE - compute_gae| = {difference:.1e}")

row = args.episode
steps = int(mask[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {
        "t": t,
        "token": tokens[t],
        "action": int(batch.actions[row, t]),
        "log_pi": float(batch.logprobs[row, t]),
        "log_pi_ref": float(batch.logprobs[row, t] - batch.kl[row, t]),
        "kl": float(batch.kl[row, t]),
        "reward": float(batch.rewards[row, t]),
        "value": float(values[row, t]),
        "td_error": float(td[row, t]),
        "advantage": float(advantages[row, t]),
        "return": float(returns[row, t]),
        "G-V (lam=1)": float(monte_carlo[row, t]),
    }
    for t in range(steps)
]
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "one episode, per token (value = V(s_t), before the token is chosen)")
print(f"\nterminated with EOS: {bool(batch.terminated[row])}; V(s_T) after the last token: "
      f"{float(values[row, steps]):+.3f} (used only if truncated)")  # fmt: skip
print(f"advantages over the batch before whitening: mean {float(advantages[mask].mean()):+.3f}, "
      f"std {float(advantages[mask].std()):.3f}; ppo_update whitens them to mean 0, std 1")  # fmt: skip
save_json(
    args.out,
    "09_advantages_gae.json",
    {"gamma": gamma, "lam": lam, "prompt": batch.prompts[row], "terminated": bool(batch.terminated[row]),
     "value_after_last": float(values[row, steps]), "tokens": table,
     "batch": {"rewards": batch.rewards.tolist(), "values": values.tolist(), "mask": mask.tolist(),
               "terminated_steps": terminated.tolist(), "advantages": advantages.tolist(),
               "whitened": whitened.tolist()}},
)  # fmt: skip

labels = [token_strings(tok, batch.actions[b, : int(mask[b].sum())]) for b in range(len(mask))]
fig = Figure(figsize=(0.75 * batch.actions.shape[1] + 2, 0.4 * len(labels) + 1.5))
ax = fig.subplots()
title = f"GAE advantage A_t per token (gamma {gamma}, lambda {lam}): blue = better than the critic expected"
image = token_heatmap(ax, advantages, mask, labels, title)
fig.colorbar(image, ax=ax, label="A_t (before whitening)")
save_figure(fig, args.out, "09_advantage_heatmap.png")

x = np.arange(steps)
fig = Figure(figsize=(max(7, 0.6 * steps), 4.5))
ax = fig.subplots()
ax.bar(x - 0.2, [r["reward"] for r in table], 0.4, color="lightgrey", edgecolor="grey", label="reward r_t")
ax.bar(x + 0.2, [r["td_error"] for r in table], 0.4, color="tab:green", alpha=0.7, label="TD error delta_t")
ax.plot(x, [r["value"] for r in table], "o-", label="V(s_t), predicted return")
ax.plot(x, [r["return"] for r in table], "s--", color="black", label="return_t = A_t + V(s_t)")
ax.plot(x, [r["advantage"] for r in table], "D-", color="tab:red", label=f"advantage A_t (GAE, lambda {lam})")
ax.plot(x, [r["G-V (lam=1)"] for r in table], ":", color="tab:red", label="G_t - V(s_t) (lambda = 1)")
ax.axhline(0, color="grey", lw=0.8)
ax.set_xticks(x, tokens, rotation=60)
ax.set_xlabel("step t (the token chosen at t)")
ax.set_title(f"Advantage = actual minus predicted return: {batch.prompts[row]!r}")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
save_figure(fig, args.out, "09_gae_episode.png")
