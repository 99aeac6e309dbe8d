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

Run:  python examples/11_critic_loss.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/11_critic_loss.json, DIR/11_critic_loss.png (the clipped loss, and how far each value moved).
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

from agents.advantages import compute_gae
from agents.losses import value_loss
from agents.ppo import PPOConfig, ppo_update, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 32
    """Episodes in the batch."""
    episode: int = 0
    """Which episode to tabulate."""


args = parse_args(Args, __doc__)
agent, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
eps = config.clip_range_value
batch = rollout(agent, make_env(args.episodes), args.seed)
mask = batch.mask
with torch.no_grad():
    old_values = score_rollout(agent, batch, 1.0).values  # (B, T + 1)
_, returns = compute_gae(
    batch.rewards, old_values[:, :-1], old_values[:, 1:], batch.terminated_steps, mask, config.gamma, config.lam
)  # fmt: skip  (B, T): the critic's targets
old = old_values[:, :-1]

optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)
metrics = ppo_update(agent.train(), optimizer, batch, config, 1.0, torch.Generator().manual_seed(args.seed))
with torch.no_grad():
    new = score_rollout(agent.eval(), batch, 1.0).values[:, :-1]  # (B, T) V after the update
clipped_values = old + torch.clamp(new - old, -eps, eps)
unclipped_loss, clipped_loss = (new - returns) ** 2, (clipped_values - returns) ** 2
per_token = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
is_clipped = (clipped_loss > unclipped_loss) & ((new - old).abs() > eps)  # a tie inside the range is no clip
loss, stats = value_loss(new, old, returns, mask, eps)  # the library, same tensors
print(f"eps = {eps}; vf_coef = {config.vf_coef} (the value loss's weight in ppo_update's combined loss)")
print(f"0.5 * mean(max(...)) = {float(per_token[mask].mean()):.5f}   value_loss = {float(loss):.5f}")
print(
    f"clipped fraction = {float(is_clipped[mask].float().mean()):.4f}   value_loss's value_clipfrac = "
    f"{float(stats['ppo/value_clipfrac']):.4f}   (during the update: {metrics['ppo/value_clipfrac']:.4f})"
)
moved = (new - old)[mask].abs()
print(f"|V_new - V_old|: mean {float(moved.mean()):.3f}, max {float(moved.max()):.3f}; "
      f"mean squared error to the targets: before {float(((old - returns)[mask] ** 2).mean()):.4f}, "
      f"after {float(((new - returns)[mask] ** 2).mean()):.4f}")  # fmt: skip

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
    {"clip_range_value": eps, "value_loss": float(loss), "value_clipfrac": float(stats["ppo/value_clipfrac"]),
     "tokens": table, "all": {"V_old": old[mask].tolist(), "V_new": new[mask].tolist(),
                              "return": returns[mask].tolist(), "clipped": is_clipped[mask].tolist()}},
)  # fmt: skip

fig = Figure(figsize=(14, 5))
left, right = fig.subplots(1, 2)
v = np.linspace(-1.0, 1.0, 401)
for v_old, target, color in ((0.0, 0.6, "tab:blue"), (0.0, -0.4, "tab:orange")):  # two illustrative tokens
    v_clip = v_old + np.clip(v - v_old, -eps, eps)
    left.plot(v, 0.5 * np.maximum((v - target) ** 2, (v_clip - target) ** 2), color=color,
              label=f"V_old = {v_old}, return = {target}: clipped loss")  # fmt: skip
    left.plot(v, 0.5 * (v - target) ** 2, ":", color=color, label="unclipped 0.5 (V - return)^2")
    left.axvline(target, color=color, lw=0.8)
left.axvspan(-eps, eps, color="grey", alpha=0.1, label=f"V_old ± eps (eps = {eps})")
left.set_xlabel("new value V")
left.set_ylabel("loss")
left.set_title(
    "Past V_old ± eps toward the target the loss is flat (no gradient);\n"
    "everywhere else it is the plain 0.5 (V - return)^2 (dotted)",
    fontsize=10,
)
left.legend(fontsize=7)
old_np, new_np, ret_np, clip_np = (x.numpy() for x in (old[mask], new[mask], returns[mask], is_clipped[mask]))
right.scatter(ret_np - old_np, new_np - old_np, s=12, c=np.where(clip_np, "tab:red", "tab:blue"))
lim = float(np.abs(ret_np - old_np).max()) * 1.05
right.plot([-lim, lim], [-lim, lim], ":", color="grey", label="V_new = return (the target reached)")
for edge in (-eps, eps):
    right.axhline(edge, color="grey", lw=0.8, ls="--")
right.set_xlabel("return - V_old (how far the target was)")
right.set_ylabel("V_new - V_old (how far the value moved in one update)")
right.set_title(f"All {len(old_np)} tokens of one ppo_update (red: clipped; dashed: ± eps)")
right.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, args.out, "11_critic_loss.png")
