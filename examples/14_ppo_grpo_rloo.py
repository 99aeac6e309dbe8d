"""14 - PPO, RLOO and GRPO on the same batch: three ways to say "better than expected".

All three update the actor with the same clipped loss (10); they differ in the
advantage A_t, that is in the baseline the return is compared against:

    PPO   A_t = GAE(gamma, lambda) of the rewards against the critic's V(s_t)       per token
    RLOO  A_i = R_i - mean_{j != i} R_j      over the k responses to the same prompt   one value per response
    GRPO  A_i = (R_i - mean_j R_j) / std_j R_j   over the same group                  one value per response

where R_i = sum_t r_t is response i's return (score minus beta times its KL). The
script samples k responses to each of a few prompts once, with the warm agent,
and computes the three advantages of that one batch with agents.ppo.ADVANTAGES, the
functions ppo_update uses.

Run:  python examples/14_ppo_grpo_rloo.py [--out DIR] [--seed N] [--prompts N] [--group-size K]
Writes: DIR/14_ppo_grpo_rloo.json, DIR/14_ppo_grpo_rloo.png (PPO's per-token advantages beside RLOO's and GRPO's
        one value per response, on one colour scale).
"""

from dataclasses import dataclass

import torch
from common import (
    ExampleArgs,
    make_env,
    parse_args,
    print_table,
    save_figure,
    save_json,
    token_heatmap,
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure

from agents.ppo import ADVANTAGES, PPOConfig, score_rollout
from agents.rollout import collect_rollout


@dataclass
class Args(ExampleArgs):
    prompts: int = 4
    """Distinct prompts in the batch."""
    group_size: int = 4
    """k: responses sampled per prompt."""


args = parse_args(Args, __doc__)
agent, tok = warm_agent(args.out), tokenizer()
episodes = args.prompts * args.group_size
env = make_env(episodes)
batch = collect_rollout(agent, env, 1.0, args.seed, torch.Generator().manual_seed(args.seed), None, args.group_size)
mask = batch.mask  # (B, T); rows k*i .. k*i + k - 1 share prompt i
with torch.no_grad():
    values = score_rollout(agent, batch, 1.0).values  # (B, T + 1), used by PPO only
advantages = {}
for algo in ("ppo", "rloo", "grpo"):
    config = PPOConfig(algo=algo, group_size=args.group_size)
    advantages[algo], _ = ADVANTAGES[algo](batch.rewards, values, batch.terminated_steps, mask, config)  # (B, T)
episode_returns = (batch.rewards * mask).sum(1)  # (B,) R_i

rows = []
for b in range(episodes):
    rows.append({"episode": b, "group": b // args.group_size, "response": batch.responses[b][:40],
                 "score": float(batch.scores[b]), "R_i": float(episode_returns[b]), "V(s_0)": float(values[b, 0]),
                 "A_ppo[0]": float(advantages["ppo"][b, 0]), "A_rloo": float(advantages["rloo"][b, 0]),
                 "A_grpo": float(advantages["grpo"][b, 0])})  # fmt: skip
print_table(rows, f"{args.prompts} prompts x {args.group_size} responses: returns and the three advantages")
for algo, a in advantages.items():
    constant = all(len(set(a[b][mask[b]].tolist())) == 1 for b in range(episodes))
    print(f"{algo:5s} advantages: mean {float(a[mask].mean()):+.3f}, std {float(a[mask].std()):.3f}, "
          f"largest |A| {float(a[mask].abs().max()):.2f}, one value per response: {constant}")  # fmt: skip
save_json(
    args.out,
    "14_ppo_grpo_rloo.json",
    {"group_size": args.group_size, "gamma": PPOConfig().gamma, "lam": PPOConfig().lam, "prompts": batch.prompts,
     "rows": rows, "mask": mask.tolist(), "rewards": batch.rewards.tolist(), "values": values.tolist(),
     "terminated_steps": batch.terminated_steps.tolist(), "advantages": {k: v.tolist() for k, v in advantages.items()}},
)  # fmt: skip

labels = [token_strings(tok, batch.actions[b, : int(mask[b].sum())]) for b in range(episodes)]
longest = int(mask.sum(1).max())  # columns drawn: the longest response, not the env's max_new_tokens
limit = max(float(a[mask].abs().max()) for a in advantages.values())  # one colour scale for all three panels
fig = Figure(figsize=(min(14.0, 0.42 * longest + 7), 0.34 * episodes + 2.4))
grid = fig.add_gridspec(1, 4, width_ratios=[longest, 2.8, 2.8, 0.5])
ppo_ax = fig.add_subplot(grid[0])
image = token_heatmap(ppo_ax, advantages["ppo"][:, :longest], mask[:, :longest], labels,
                      "PPO: GAE against the critic, one value per token", limit=limit)  # fmt: skip
ppo_ax.set_yticks(range(episodes), [f"{b}: prompt {b // args.group_size}, score {float(batch.scores[b]):+.2f}"
                                    for b in range(episodes)], fontsize=8)  # fmt: skip
for algo, column, title in (("rloo", 1, f"RLOO: R_i minus the\nmean of the other {args.group_size - 1}"),
                            ("grpo", 2, "GRPO: R_i standardised\nin its group")):  # fmt: skip
    ax = fig.add_subplot(grid[column], sharey=ppo_ax)
    per_response = advantages[algo][:, :1].numpy()  # (B, 1): the same value on every token of a response
    ax.imshow(per_response, cmap="RdBu", aspect="auto", vmin=-limit, vmax=limit)
    for b, value in enumerate(per_response[:, 0]):
        ax.text(0, b, f"{value:+.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(value) > 0.6 * limit else "black")  # fmt: skip
    ax.set_xticks([])
    ax.tick_params(labelleft=False)
    ax.set_xlabel("every token\nof the response")
    ax.set_title(title, fontsize=9)
for ax in fig.axes:
    for g in range(1, args.prompts):
        ax.axhline(g * args.group_size - 0.5, color="black", lw=1.2)  # group boundaries
fig.colorbar(image, cax=fig.add_subplot(grid[3]), label="advantage (before whitening; reward units, GRPO's in stds)")
fig.suptitle("One batch, three advantages, one colour scale (blue: better than the baseline, red: worse; lines "
             "separate the prompts' groups)", fontsize=11)  # fmt: skip
fig.tight_layout()
save_figure(fig, args.out, "14_ppo_grpo_rloo.png")
