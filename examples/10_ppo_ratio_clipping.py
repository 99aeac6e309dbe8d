"""10 - PPO's probability ratio and clipping.

After the rollout, PPO takes several gradient steps on the same episodes. To keep
the new policy close to the one that sampled them, it weighs each token's advantage
by the probability ratio rho_t = pi(a_t|s_t) / pi_old(a_t|s_t) and clips it:

    L_clip = -mean_t min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)    (agents.losses.policy_loss)

Once rho_t has moved past 1 + eps (A_t > 0) or below 1 - eps (A_t < 0), the minimum
picks the clipped, constant term: that token's gradient is 0, and it cannot pull
the policy further. The script runs one real ppo_update (4 epochs over a batch),
then computes each token's ratio between the policy after and before it.

The update is a typical one: Adam continues with the state it had at the end of the
warm agent's training, at the learning rate a 20-iteration run has at iteration 6.
For contrast it then repeats the update from the same start with a fresh Adam
(atypical: its first steps move every weight by about the learning rate, so the
policy moves several times further than in any iteration of a real run).

Run:  python examples/10_ppo_ratio_clipping.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/10_ppo_ratio_clipping.json, DIR/10_ppo_ratio_clipping.png (the objective, with this update's tokens).
"""

import copy
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
    warm_optimizer,
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
    run_iterations: int = 20
    """The typical update uses the learning rate of a run this long at the warm agent's iteration."""


def update(agent, optimizer) -> tuple[dict[str, float], torch.Tensor]:
    """One real ppo_update of ``agent`` on the batch: (its metrics, log pi_new of the batch's tokens after it)."""
    generator = torch.Generator().manual_seed(args.seed)
    metrics = ppo_update(agent.train(), optimizer, batch, config, 1.0, generator, kl_coef=env.kl_coef)
    with torch.no_grad():
        return metrics, score_rollout(agent.eval(), batch, 1.0).logprobs


args = parse_args(Args, __doc__)
agent, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
eps = config.clip_range
env = make_env(args.episodes)
batch = rollout(agent, env, args.seed)
mask = batch.mask
with torch.no_grad():
    old = score_rollout(agent, batch, 1.0)  # log pi_old (B, T) and V_old (B, T + 1), as ppo_update computes them
advantages, _ = compute_gae(batch.rewards, old.values[:, :-1], old.values[:, 1:], batch.terminated_steps, mask,
                            config.gamma, config.lam)  # fmt: skip
advantages = masked_whiten(advantages, mask)  # what ppo_update feeds to policy_loss

# Atypical first: a fresh Adam on a copy of the warm agent.
fresh_agent = copy.deepcopy(agent)
fresh_metrics, fresh_logprobs = update(
    fresh_agent, torch.optim.Adam(fresh_agent.parameters(), config.learning_rate, eps=1e-5)
)
fresh_ratio = torch.exp(fresh_logprobs - old.logprobs)  # (B, T)
# Typical: Adam's moments as the warm agent's training left them (its last checkpoint), the run's learning rate.
optimizer = warm_optimizer(agent, args.out, args.run_iterations)
lr = optimizer.param_groups[0]["lr"]  # the linear decay of agents.train, at the warm agent's iteration
metrics, new_logprobs = update(agent, optimizer)
ratio = torch.exp(new_logprobs - old.logprobs)  # (B, T)
unclipped = ratio * advantages
clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * advantages
objective = torch.minimum(unclipped, clipped)  # what PPO maximises, per token
is_clipped = clipped < unclipped  # the min took the clipped term: zero gradient for this token
loss, stats = policy_loss(new_logprobs, old.logprobs, advantages, mask, eps)  # the library, same tensors
print(f"eps = {eps}; one ppo_update: {config.epochs} epochs, minibatches of {config.minibatch_size} episodes")
print(f"typical update (warm Adam, lr {lr:.1e}), during it: clipfrac {metrics['ppo/clipfrac']:.3f}, "
      f"approx_kl {metrics['ppo/approx_kl']:.4f}")  # fmt: skip
print(f"atypical update (fresh Adam, lr {config.learning_rate:.0e}), during it: clipfrac "
      f"{fresh_metrics['ppo/clipfrac']:.3f}, approx_kl {fresh_metrics['ppo/approx_kl']:.4f}")  # fmt: skip
print(f"after it: ratio range [{float(ratio[mask].min()):.3f}, {float(ratio[mask].max()):.3f}], "
      f"outside [1-eps, 1+eps]: {float(((ratio - 1).abs() > eps)[mask].float().mean()):.1%} of tokens "
      f"(after the atypical one: {float(((fresh_ratio - 1).abs() > eps)[mask].float().mean()):.1%})")  # fmt: skip
print(f"-mean(objective) = {float(-objective[mask].mean()):+.5f}   policy_loss = {float(loss):+.5f}")
print(f"clipped fraction = {float(is_clipped[mask].float().mean()):.4f}   policy_loss clipfrac = "
      f"{float(stats['ppo/clipfrac']):.4f}")  # fmt: skip

row = args.episode
steps = int(mask[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "advantage": float(advantages[row, t]), "ratio": float(ratio[row, t]),
     "rho*A": float(unclipped[row, t]), "clip(rho)*A": float(clipped[row, t]), "objective": float(objective[row, t]),
     "clipped": bool(is_clipped[row, t])}
    for t in range(steps)
]  # fmt: skip
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "per token: ratio pi_new / pi_old after the update, and the clipped objective")
save_json(
    args.out,
    "10_ppo_ratio_clipping.json",
    {"clip_range": eps, "lr": lr, "policy_loss": float(loss), "clipfrac": float(stats["ppo/clipfrac"]),
     "approx_kl": float(stats["ppo/approx_kl"]), "update_metrics": metrics, "tokens": table,
     "optimizer_steps": config.epochs * -(-args.episodes // config.minibatch_size),
     "share_outside": float(((ratio - 1).abs() > eps)[mask].float().mean()),
     "all": {"ratio": ratio[mask].tolist(), "advantage": advantages[mask].tolist(),
             "objective": objective[mask].tolist(), "clipped": is_clipped[mask].tolist()},
     "fresh_optimizer": {"lr": config.learning_rate, "update_metrics": fresh_metrics,
                         "share_outside": float(((fresh_ratio - 1).abs() > eps)[mask].float().mean()),
                         "share_beyond_10x": float(((fresh_ratio > 10) | (fresh_ratio < 0.1))[mask].float().mean()),
                         "ratio": fresh_ratio[mask].tolist()}},
)  # fmt: skip

top = 2.5  # the objective is drawn for r in [0, top]; tokens beyond are counted, not drawn
r = np.linspace(0, top, 501)
a_all, r_all, c_all = advantages[mask].numpy(), ratio[mask].numpy(), is_clipped[mask].numpy()
fig = Figure(figsize=(14, 4.8))
axes = fig.subplots(1, 3)
for ax, sign in zip(axes[:2], (1, -1)):
    curve = np.minimum(r * sign, np.clip(r, 1 - eps, 1 + eps) * sign)  # the objective per unit |A|
    ax.plot(r, r * sign, ":", color="grey", label="rho A / |A|  (unclipped)")
    ax.plot(r, curve, color="black", label="min(rho A, clip(rho, 1-eps, 1+eps) A) / |A|")
    ax.axvspan(1 + eps if sign > 0 else 0, top if sign > 0 else 1 - eps, color="tab:red", alpha=0.08,
               label="flat part: zero gradient")  # fmt: skip
    pick = ((a_all > 0) if sign > 0 else (a_all < 0)) & (r_all <= top)
    beyond = int((((a_all > 0) if sign > 0 else (a_all < 0)) & (r_all > top)).sum())
    points = np.minimum(r_all[pick] * sign, np.clip(r_all[pick], 1 - eps, 1 + eps) * sign)
    ax.scatter(r_all[pick], points, s=14, c=np.where(c_all[pick], "tab:red", "tab:blue"), zorder=3,
               label="tokens of this update (red: clipped)")  # fmt: skip
    ax.text(0.98, 0.5, f"{pick.sum()} tokens drawn\n{beyond} beyond rho = {top}", transform=ax.transAxes,
            ha="right", fontsize=8)  # fmt: skip
    for edge in (1 - eps, 1 + eps):
        ax.axvline(edge, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, top)
    ax.set_xlabel("ratio rho = pi_new(a_t|s_t) / pi_old(a_t|s_t)")
    ax.set_ylabel("objective / |A|")
    ax.set_title(f"A > 0: no gain from raising rho past {1 + eps}" if sign > 0 else
                 f"A < 0: no gain from lowering rho below {1 - eps}")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left" if sign > 0 else "lower left")
fresh_all = fresh_ratio[mask].numpy()
bins = np.linspace(min(np.log10(r_all).min(), np.log10(fresh_all).min()),
                   max(np.log10(r_all).max(), np.log10(fresh_all).max()), 61)  # fmt: skip
axes[2].hist(np.log10(fresh_all), bins=bins, color="tab:orange", alpha=0.6,
             label=f"atypical: fresh Adam (approx_kl {fresh_metrics['ppo/approx_kl']:.2f})")  # fmt: skip
axes[2].hist(np.log10(r_all), bins=bins, color="tab:blue", alpha=0.7,
             label=f"typical: warm Adam (approx_kl {metrics['ppo/approx_kl']:.3f})")  # fmt: skip
for edge in (1 - eps, 1 + eps):
    axes[2].axvline(np.log10(edge), color="grey", lw=0.8, ls="--")
axes[2].set_yscale("log")
axes[2].set_xlabel("log10 of the ratio rho after the update (dashed: 1 - eps, 1 + eps)")
axes[2].set_ylabel("tokens (log scale)")
axes[2].set_title(f"Ratios of all {len(r_all)} tokens after one ppo_update")
axes[2].legend(fontsize=7)
fig.tight_layout()
save_figure(fig, args.out, "10_ppo_ratio_clipping.png")
