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
Writes: DIR/14_ppo_grpo_rloo.json, DIR/14_ppo_grpo_rloo.png (the three advantage heatmaps side by side).
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
width = batch.actions.shape[1]
fig = Figure(figsize=(3 * (0.55 * width + 1.5), 0.42 * episodes + 2))
titles = {
    "ppo": "PPO: GAE against the critic, per token",
    "rloo": f"RLOO: R_i minus the other {args.group_size - 1} responses' mean",
    "grpo": "GRPO: R_i standardised within its group",
}
for ax, (algo, a) in zip(fig.subplots(1, 3, sharey=True), advantages.items()):
    image = token_heatmap(ax, a, mask, labels, titles[algo])
    for g in range(1, args.prompts):
        ax.axhline(g * args.group_size - 0.5, color="black", lw=1.2)  # group boundaries
    fig.colorbar(image, ax=ax, fraction=0.04, label="advantage (before whitening)")
ax.set_yticks(range(episodes), [f"{b} (prompt {b // args.group_size})" for b in range(episodes)])
fig.suptitle("One batch, three advantages (blue: better than the baseline; lines separate the prompts' groups)")
fig.tight_layout()
save_figure(fig, args.out, "14_ppo_grpo_rloo.png")
