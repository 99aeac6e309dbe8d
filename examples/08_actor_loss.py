"""08 - The actor loss: make tokens with a positive advantage likelier, the others less likely.

The policy-gradient loss of the actor is, per token and averaged over the tokens,

    L = -mean_t A_t * log pi(a_t | s_t)

where the advantage A_t says how much better the token turned out than the critic
expected (09 shows how A_t is computed). A gradient step on L raises log pi of the
tokens with A_t > 0 and lowers it for A_t < 0. PPO's loss (agents.losses.policy_loss,
see 10) is -mean_t A_t * ratio_t, with ratio_t = pi / pi_old; at the first step pi = pi_old,
and its gradient is exactly that of L, since d ratio = ratio * d log pi = d log pi there.

The script checks that equality on the gradients, takes one plain SGD step on
policy_loss and shows how each token's log-prob moved against its advantage.

Run:  python examples/08_actor_loss.py [--out DIR] [--seed N] [--episodes N] [--lr LR]
Writes: DIR/08_actor_loss.json, DIR/08_actor_loss.png (change of log pi against A_t).
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

from agents.advantages import compute_gae, masked_mean, masked_whiten
from agents.losses import policy_loss
from agents.ppo import PPOConfig, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 16
    """Episodes in the batch."""
    episode: int = 0
    """Which one to tabulate."""
    lr: float = 0.05
    """SGD step size."""


args = parse_args(Args, __doc__)
agent, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
batch = rollout(agent, make_env(args.episodes), args.seed)
mask = batch.mask  # (B, T)
actor = [p for p in agent.policy.parameters()]

scored = score_rollout(agent, batch, 1.0)  # logprobs (B, T) with the graph attached, values (B, T + 1)
values = scored.values.detach()
advantages, _ = compute_gae(batch.rewards, values[:, :-1], values[:, 1:], batch.terminated_steps, mask,
                            config.gamma, config.lam)  # fmt: skip
advantages = masked_whiten(advantages, mask)  # as ppo_update does: mean 0, std 1 over the valid tokens
logprobs_before = scored.logprobs.detach()

# The textbook actor loss and PPO's loss at ratio 1: different values, the same gradient.
textbook = -masked_mean(advantages * scored.logprobs, mask)
ppo, _ = policy_loss(scored.logprobs, logprobs_before, advantages, mask, config.clip_range)
grad_textbook = torch.autograd.grad(textbook, actor, retain_graph=True)
grad_ppo = torch.autograd.grad(ppo, actor)
difference = max(float((a - b).abs().max()) for a, b in zip(grad_textbook, grad_ppo))
size = max(float(g.abs().max()) for g in grad_ppo)
print(f"loss values: -mean(A * log pi) = {textbook.item():+.4f}, policy_loss at ratio 1 = {ppo.item():+.4f}")
print(f"gradients:   max |difference| = {difference:.1e} (largest gradient entry {size:.1e})")

# One plain gradient-descent step on the actor with PPO's loss, then re-score the same tokens.
with torch.no_grad():
    for p, g in zip(actor, grad_ppo):
        p -= args.lr * g
    logprobs_after = score_rollout(agent, batch, 1.0).logprobs
change = logprobs_after - logprobs_before  # (B, T)
gain = float(masked_mean(advantages * change, mask))
agree = float(masked_mean(((advantages > 0) == (change > 0)).float(), mask))
print(f"after one SGD step (lr {args.lr}): mean(A * change of log pi) = {gain:+.4f} (> 0: the loss went down)")
print(f"tokens whose log pi moved in the direction of the sign of A: {agree:.0%}")

row = args.episode
steps = int(mask[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "advantage": float(advantages[row, t]),
     "log_pi_before": float(logprobs_before[row, t]), "log_pi_after": float(logprobs_after[row, t]),
     "change": float(change[row, t])}
    for t in range(steps)
]  # fmt: skip
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "one episode: the advantage and the log-prob of each token before and after the step")
save_json(
    args.out,
    "08_actor_loss.json",
    {"loss_textbook": textbook.item(), "loss_ppo": ppo.item(), "grad_max_difference": difference,
     "grad_max": size, "mean_advantage_times_change": gain, "sign_agreement": agree, "tokens": table,
     "all_advantages": advantages[mask].tolist(), "all_changes": change[mask].tolist()},
)  # fmt: skip

fig = Figure(figsize=(14, 4.8))
left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.5]})
a, c = advantages[mask], change[mask]
left.scatter(a, c, s=12, c=["tab:blue" if v > 0 else "tab:red" for v in a], alpha=0.7)
left.axhline(0, color="grey", lw=0.8)
left.axvline(0, color="grey", lw=0.8)
left.set_yscale("symlog", linthresh=0.01)  # linear within ±0.01, logarithmic beyond
left.set_xlabel("advantage A_t (whitened)")
left.set_ylabel("change of log pi(a_t|s_t) after one step (symlog)")
left.set_title(f"All {int(mask.sum())} tokens of the batch: {agree:.0%} move with the sign of A_t")
x = torch.arange(steps)
right.bar(x - 0.2, [r["advantage"] for r in table], 0.4, color="tab:blue", label="advantage A_t (left axis)")
right.set_ylabel("advantage A_t")
twin = right.twinx()
twin.bar(x + 0.2, [r["change"] for r in table], 0.4, color="tab:orange", label="change of log pi (right axis)")
twin.set_ylabel("change of log pi(a_t|s_t)")
for axis, values in ((right, [r["advantage"] for r in table]), (twin, [r["change"] for r in table])):
    limit = 1.1 * max(abs(v) for v in values)
    axis.set_ylim(-limit, limit)  # both axes centred on 0, so signs line up
right.axhline(0, color="grey", lw=0.8)
right.set_xticks(x, tokens, rotation=60)
right.set_title(f"One episode: {batch.prompts[row]!r} → {batch.responses[row]!r}", fontsize=9)
handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
right.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8)
fig.suptitle("The actor loss -mean(A_t * log pi(a_t|s_t)): one gradient step on it")
fig.tight_layout()
save_figure(fig, args.out, "08_actor_loss.png")
