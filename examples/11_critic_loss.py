"""11 - The critic loss, with value clipping.

The critic is trained to predict the return: its target is return_t = A_t + V_old(s_t)
(GAE, computed before the update, see 09). PPO clips the value as it clips the
ratio: the new prediction is not rewarded for moving more than eps from the old one.

    V_clip = V_old + clip(V - V_old, -eps, +eps)
    L_V    = 0.5 * mean_t max((V - return)^2, (V_clip - return)^2)     (agents.losses.value_loss)

Where the max picks the clipped term, that token's gradient is 0: that happens only when V
has moved more than eps from V_old in the target's direction and is still closer to the
target than V_clip is (V_clip then stops at V_old + eps, short of the target). Everywhere
else, including past eps away from the target, the loss is the plain squared error
0.5 * (V - return)^2. The script runs one real ppo_update, then evaluates the loss per
token with the values after it.

The update is a typical one, as in 10: Adam continues with the state the warm agent's
training left, at the learning rate a 20-iteration run has at iteration 6. In such an
update no value moves by eps, and nothing is clipped (real runs log a value clip
fraction near 0, see 12). For contrast the script repeats the update from the same
start with a fresh Adam (atypical: its first steps move every weight by about the
learning rate): there the values move further. The library's eps is 1.0
(``PPOConfig.clip_range_value``; many implementations use 0.2, which held this critic
back: docs/design.md), so even they stay inside it; the script also counts the share
of values that moved more than 0.2.

Run:  python examples/11_critic_loss.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/11_critic_loss.json, DIR/11_critic_loss.png (the clipped loss, and how far each value moved).
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

from agents.advantages import compute_gae
from agents.losses import value_loss
from agents.ppo import PPOConfig, ppo_update, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 32
    """Episodes in the batch."""
    episode: int = 0
    """Which episode to tabulate."""
    run_iterations: int = 20
    """The update uses the learning rate of a run this long at the warm agent's iteration (as 10 does)."""


args = parse_args(Args, __doc__)
agent, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
eps = config.clip_range_value
env = make_env(args.episodes)
batch = rollout(agent, env, args.seed)
mask = batch.mask
with torch.no_grad():
    old_values = score_rollout(agent, batch, 1.0).values  # (B, T + 1)
_, returns = compute_gae(
    batch.rewards, old_values[:, :-1], old_values[:, 1:], batch.terminated_steps, mask, config.gamma, config.lam
)  # fmt: skip  (B, T): the critic's targets
old = old_values[:, :-1]


def update(agent, optimizer) -> tuple[dict[str, float], torch.Tensor]:
    """One real ppo_update of ``agent`` on the batch: (its metrics, V after it (B, T))."""
    generator = torch.Generator().manual_seed(args.seed)
    metrics = ppo_update(agent.train(), optimizer, batch, config, 1.0, generator, kl_coef=env.kl_coef)
    with torch.no_grad():
        return metrics, score_rollout(agent.eval(), batch, 1.0).values[:, :-1]


def clipping(new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V_clip, (V - R)^2, (V_clip - R)^2, per-token loss, clipped?) of new values V against V_old, all (B, T)."""
    clipped_values = old + torch.clamp(new - old, -eps, eps)
    unclipped_loss, clipped_loss = (new - returns) ** 2, (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    is_clipped = (clipped_loss > unclipped_loss) & ((new - old).abs() > eps)  # a tie inside the range is no clip
    return clipped_values, unclipped_loss, clipped_loss, per_token, is_clipped


# Atypical first, for contrast: a fresh Adam on a copy (its first steps move every weight by about the learning
# rate, as in 10), the only way clipping shows up in one update of this task.
fresh_agent = copy.deepcopy(agent)
fresh_metrics, fresh_new = update(fresh_agent, torch.optim.Adam(fresh_agent.parameters(), config.learning_rate,
                                                                eps=1e-5))  # fmt: skip
fresh_clipped = clipping(fresh_new)[-1]
# Typical: Adam as a run would have it at the warm agent's iteration (see common.warm_optimizer).
optimizer = warm_optimizer(agent, args.out, args.run_iterations)
metrics, new = update(agent, optimizer)
clipped_values, unclipped_loss, clipped_loss, per_token, is_clipped = clipping(new)
loss, stats = value_loss(new, old, returns, mask, eps)  # the library, same tensors
moved, fresh_moved = (new - old)[mask].abs(), (fresh_new - old)[mask].abs()
print(f"eps = {eps}; vf_coef = {config.vf_coef} (the value loss's weight in ppo_update's combined loss)")
print(f"0.5 * mean(max(...)) = {float(per_token[mask].mean()):.5f}   value_loss = {float(loss):.5f}")
print(f"typical update (warm Adam, lr {optimizer.param_groups[0]['lr']:.1e}): value clip fraction during it (what a "
      f"run logs: each minibatch measured before its own step, the first at V = V_old) "
      f"{metrics['ppo/value_clipfrac']:.4f};"
      f" after all {config.epochs} epochs, V_new against V_old: {float(is_clipped[mask].float().mean()):.4f} "
      f"(value_loss's value_clipfrac {float(stats['ppo/value_clipfrac']):.4f})")  # fmt: skip
print(f"  |V_new - V_old|: mean {float(moved.mean()):.3f}, max {float(moved.max()):.3f} (eps = {eps}); "
      f"mean squared error to the targets: before {float(((old - returns)[mask] ** 2).mean()):.4f}, "
      f"after {float(((new - returns)[mask] ** 2).mean()):.4f}")  # fmt: skip
print(f"atypical update (fresh Adam, lr {config.learning_rate:.0e}): during it "
      f"{fresh_metrics['ppo/value_clipfrac']:.4f}, after it {float(fresh_clipped[mask].float().mean()):.4f}; "
      f"|V_new - V_old| mean "
      f"{float(fresh_moved.mean()):.3f}, max {float(fresh_moved.max()):.3f}, beyond 0.2: "
      f"{float((fresh_moved > 0.2).float().mean()):.1%}")  # fmt: skip

row = args.episode
steps = int(mask[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "V_old": float(old[row, t]), "return": float(returns[row, t]),
     "V_new": float(new[row, t]), "V_clipped": float(clipped_values[row, t]),
     "(V-R)^2": float(unclipped_loss[row, t]), "(Vclip-R)^2": float(clipped_loss[row, t]),
     "loss_term": float(per_token[row, t]), "clipped": bool(is_clipped[row, t])}
    for t in range(steps)
]  # fmt: skip
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "per token: old and new value, target, and the clipped value loss")
save_json(
    args.out,
    "11_critic_loss.json",
    {"clip_range_value": eps, "lr": optimizer.param_groups[0]["lr"], "value_loss": float(loss),
     "value_clipfrac": float(stats["ppo/value_clipfrac"]), "update_metrics": metrics,
     "moved": {"mean": float(moved.mean()), "max": float(moved.max())},
     "fresh_optimizer": {"lr": config.learning_rate, "update_metrics": fresh_metrics,
                         "value_clipfrac": float(fresh_clipped[mask].float().mean()),
                         "moved": {"mean": float(fresh_moved.mean()), "max": float(fresh_moved.max()),
                                   "share_over_0_2": float((fresh_moved > 0.2).float().mean())},
                         "V_new": fresh_new[mask].tolist()},
     "tokens": table, "all": {"V_old": old[mask].tolist(), "V_new": new[mask].tolist(),
                              "return": returns[mask].tolist(), "clipped": is_clipped[mask].tolist()}},
)  # fmt: skip

fig = Figure(figsize=(13, 5))
left, right = fig.subplots(1, 2)
v = np.linspace(-5 * eps, 5 * eps, 401)
for v_old, target, color in ((0.0, 3 * eps, "tab:green"), (0.0, -2 * eps, "tab:purple")):  # two illustrative tokens
    v_clip = v_old + np.clip(v - v_old, -eps, eps)
    left.plot(v, 0.5 * np.maximum((v - target) ** 2, (v_clip - target) ** 2), color=color,
              label=f"V_old = {v_old}, return = {target}: clipped loss")  # fmt: skip
    left.plot(v, 0.5 * (v - target) ** 2, ":", color=color, label="unclipped 0.5 (V - return)^2")
    left.axvline(target, color=color, lw=0.8)
left.axvspan(-eps, eps, color="grey", alpha=0.1, label=f"V_old ± eps (eps = {eps})")
left.set_xlabel("new value V (reward units)")
left.set_ylabel("value loss of one token")
left.set_title(
    "Past V_old ± eps toward the target the loss is flat (no gradient);\n"
    "everywhere else it is the plain 0.5 (V - return)^2 (dotted)",
    fontsize=10,
)
left.legend(fontsize=7)
old_np, ret_np = old[mask].numpy(), returns[mask].numpy()
for values_after, flags, color, label in (
    (fresh_new[mask].numpy(), fresh_clipped[mask].numpy(), "tab:orange",
     f"atypical, fresh Adam: {float(fresh_clipped[mask].float().mean()):.1%} clipped"),
    (new[mask].numpy(), is_clipped[mask].numpy(), "tab:blue",
     f"typical, warm Adam: {float(is_clipped[mask].float().mean()):.1%} clipped"),
):  # fmt: skip
    right.scatter(ret_np - old_np, values_after - old_np, s=12, color=color, alpha=0.7, label=label)
    right.scatter((ret_np - old_np)[flags], (values_after - old_np)[flags], s=40, marker="x", color="tab:red")
right.scatter([], [], s=40, marker="x", color="tab:red", label="clipped: zero gradient")
lim = float(np.abs(ret_np - old_np).max()) * 1.05
right.plot([-lim, lim], [-lim, lim], ":", color="grey", label="V_new = return (the target reached)")
for edge in (-eps, eps):
    right.axhline(edge, color="grey", lw=0.8, ls="--")
right.set_xlabel("return - V_old: how far the target was (reward units)")
right.set_ylabel("V_new - V_old: how far the value moved\nin one update (reward units)")
right.set_title(f"All {len(old_np)} tokens of one ppo_update (dashed: ± eps)", fontsize=10)
right.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, args.out, "11_critic_loss.png")
