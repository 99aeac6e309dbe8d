"""10 - PPO's probability ratio and clipping.

After the rollout, PPO takes several gradient steps on the same episodes. To keep
the new policy close to the one that sampled them, it weighs each token's advantage
by the ratio r_t = pi(a_t|s_t) / pi_old(a_t|s_t) and clips it:

    L_clip = -mean_t min(r_t * A_t, clip(r_t, 1 - eps, 1 + eps) * A_t)    (agents.losses.policy_loss)

Once r_t has moved past 1 + eps (A_t > 0) or below 1 - eps (A_t < 0), the minimum
picks the clipped, constant term: that token's gradient is 0, and it cannot pull
the policy further. The script runs one real ppo_update (4 epochs over a batch),
then computes each token's ratio between the policy after and before it.

Run:  python examples/10_ppo_ratio_clipping.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/10_ppo_ratio_clipping.json, DIR/10_ppo_ratio_clipping.png (the objective, with this update's tokens).
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
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure

from agents.advantages import compute_gae, masked_whiten
from agents.losses import policy_loss
from agents.ppo import PPOConfig, ppo_update, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 32
    """Episodes in the batch."""
    episode: int = 0
    """Which episode to tabulate."""


args = parse_args(Args, __doc__)
agent, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
eps = config.clip_range
batch = rollout(agent, make_env(args.episodes), args.seed)
mask = batch.mask
with torch.no_grad():
    old = score_rollout(agent, batch, 1.0)  # log pi_old (B, T) and V_old (B, T + 1), as ppo_update computes them
advantages, _ = compute_gae(batch.rewards, old.values[:, :-1], old.values[:, 1:], batch.terminated_steps, mask,
                            config.gamma, config.lam)  # fmt: skip
advantages = masked_whiten(advantages, mask)  # what ppo_update feeds to policy_loss

optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)
metrics = ppo_update(agent.train(), optimizer, batch, config, 1.0, torch.Generator().manual_seed(args.seed))
with torch.no_grad():
    new = score_rollout(agent.eval(), batch, 1.0)
ratio = torch.exp(new.logprobs - old.logprobs)  # (B, T)
unclipped = ratio * advantages
clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * advantages
objective = torch.minimum(unclipped, clipped)  # what PPO maximises, per token
is_clipped = clipped < unclipped  # the min took the clipped term: zero gradient for this token
loss, stats = policy_loss(new.logprobs, old.logprobs, advantages, mask, eps)  # the library, same tensors
print(f"eps = {eps}; one ppo_update: {config.epochs} epochs, minibatches of {config.minibatch_size} episodes")
print(f"during the update (ppo_update's metrics): clipfrac {metrics['ppo/clipfrac']:.3f}, "
      f"approx_kl {metrics['ppo/approx_kl']:.4f}")  # fmt: skip
print(f"after it: ratio range [{float(ratio[mask].min()):.3f}, {float(ratio[mask].max()):.3f}], "
      f"outside [1-eps, 1+eps]: {float(((ratio - 1).abs() > eps)[mask].float().mean()):.1%} of tokens")  # fmt: skip
print(f"-mean(objective) = {float(-objective[mask].mean()):+.5f}   policy_loss = {float(loss):+.5f}")
print(f"clipped fraction = {float(is_clipped[mask].float().mean()):.4f}   policy_loss clipfrac = "
      f"{float(stats['ppo/clipfrac']):.4f}")  # fmt: skip

row = args.episode
steps = int(mask[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "advantage": float(advantages[row, t]), "ratio": float(ratio[row, t]),
     "r*A": float(unclipped[row, t]), "clip(r)*A": float(clipped[row, t]), "objective": float(objective[row, t]),
     "clipped": bool(is_clipped[row, t])}
    for t in range(steps)
]  # fmt: skip
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "per token: ratio pi_new / pi_old after the update, and the clipped objective")
save_json(
    args.out,
    "10_ppo_ratio_clipping.json",
    {"clip_range": eps, "policy_loss": float(loss), "clipfrac": float(stats["ppo/clipfrac"]), "tokens": table,
     "all": {"ratio": ratio[mask].tolist(), "advantage": advantages[mask].tolist(),
             "objective": objective[mask].tolist(), "clipped": is_clipped[mask].tolist()}},
)  # fmt: skip

top = 2.5  # the objective is drawn for r in [0, top]; tokens beyond are counted, not drawn
r = np.linspace(0, top, 501)
a_all, r_all, c_all = advantages[mask].numpy(), ratio[mask].numpy(), is_clipped[mask].numpy()
fig = Figure(figsize=(16, 4.8))
axes = fig.subplots(1, 3)
for ax, sign in zip(axes[:2], (1, -1)):
    curve = np.minimum(r * sign, np.clip(r, 1 - eps, 1 + eps) * sign)  # the objective per unit |A|
    ax.plot(r, r * sign, ":", color="grey", label="r A / |A|  (unclipped)")
    ax.plot(r, curve, color="black", label="min(r A, clip(r, 1-eps, 1+eps) A) / |A|")
    ax.axvspan(1 + eps if sign > 0 else 0, top if sign > 0 else 1 - eps, color="tab:red", alpha=0.08,
               label="flat part: zero gradient")  # fmt: skip
    pick = ((a_all > 0) if sign > 0 else (a_all < 0)) & (r_all <= top)
    beyond = int((((a_all > 0) if sign > 0 else (a_all < 0)) & (r_all > top)).sum())
    points = np.minimum(r_all[pick] * sign, np.clip(r_all[pick], 1 - eps, 1 + eps) * sign)
    ax.scatter(r_all[pick], points, s=14, c=np.where(c_all[pick], "tab:red", "tab:blue"), zorder=3,
               label="tokens of this update (red: clipped)")  # fmt: skip
    ax.text(0.98, 0.5, f"{pick.sum()} tokens drawn\n{beyond} beyond r = {top}", transform=ax.transAxes,
            ha="right", fontsize=8)  # fmt: skip
    for edge in (1 - eps, 1 + eps):
        ax.axvline(edge, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, top)
    ax.set_xlabel("ratio r = pi_new(a_t|s_t) / pi_old(a_t|s_t)")
    ax.set_ylabel("objective / |A|")
    ax.set_title(f"A > 0: no gain from raising r past {1 + eps}" if sign > 0 else
                 f"A < 0: no gain from lowering r below {1 - eps}")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left" if sign > 0 else "lower left")
axes[2].hist(np.log10(r_all), bins=60, color="tab:blue")
for edge in (1 - eps, 1 + eps):
    axes[2].axvline(np.log10(edge), color="grey", lw=0.8, ls="--")
axes[2].set_yscale("log")
axes[2].set_xlabel("log10 of the ratio r after the update (dashed: 1 - eps, 1 + eps)")
axes[2].set_ylabel("tokens (log scale)")
axes[2].set_title(f"Ratios of all {len(r_all)} tokens after one ppo_update")
fig.tight_layout()
save_figure(fig, args.out, "10_ppo_ratio_clipping.png")
