"""08 - The actor loss: first with the value V_t, then with the advantage A_t.

The first idea for an actor loss weighs each token's log-prob by the critic's
estimate of the total return, V_t = V(s_t):

    L_naive = -mean_t V_t * log pi(a_t | s_t)

It fails: when V_t > 0 (as it is here on almost every token once the critic has
learned that most responses score positively) a gradient step makes every sampled
token likelier, the best and the worst alike. What should count is how much better
the response went than the critic expected: the advantage,

    A_t = (the return actually obtained from s_t) - V(s_t)          here: A_t = G_t - V_t

(09 refines "actually obtained" with GAE.) A baseline that does not depend on the
action changes no expectation of the gradient, only its noise, and with it the
tokens of below-expectation responses are pushed down. The actor loss becomes

    L = -mean_t A_t * log pi(a_t | s_t)

PPO writes it as -mean_t A_t * rho_t with the probability ratio rho_t = pi / pi_old
(agents.losses.policy_loss, see 10); at the first step pi = pi_old, and its gradient
is exactly that of L, since d rho = rho * d log pi = d log pi there.

The script takes one plain SGD step on each loss from the same start and shows how
each token's log-prob moved against its weight, then checks the gradient equality.

Run:  python examples/08_actor_loss.py [--out DIR] [--seed N] [--episodes N] [--lr LR]
Writes: DIR/08_actor_loss.json, DIR/08_actor_loss.png (change of log pi against V_t, and against A_t).
"""

import copy
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

from agents.advantages import compute_gae, masked_mean
from agents.losses import policy_loss
from agents.ppo import PPOConfig, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 16
    """Episodes in the batch."""
    episode: int | None = None
    """Which episode to tabulate (default: the one with the largest advantage at its first token)."""
    lr: float = 0.05
    """SGD step size."""


args = parse_args(Args, __doc__)
warm, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
batch = rollout(warm, make_env(args.episodes), args.seed)
mask = batch.mask  # (B, T)
with torch.no_grad():
    values = score_rollout(warm, batch, 1.0).values[:, :-1]  # (B, T) V(s_t), the critic's prediction
zeros = torch.zeros_like(values)
returns_to_go, _ = compute_gae(batch.rewards, zeros, zeros, batch.terminated_steps, mask, config.gamma, 1.0)  # G_t
advantages = torch.where(mask, returns_to_go - values, zeros)  # (B, T) A_t = G_t - V_t: actual minus predicted


def sgd_step(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One SGD step on -mean_t weights_t * log pi(a_t|s_t) from the warm actor: (log pi before, after, gradient)."""
    agent = copy.deepcopy(warm)
    actor = list(agent.policy.parameters())
    logprobs = score_rollout(agent, batch, 1.0).logprobs  # (B, T), with the graph
    loss = -masked_mean(weights * logprobs, mask)
    grads = torch.autograd.grad(loss, actor)
    with torch.no_grad():
        for p, g in zip(actor, grads):
            p -= args.lr * g
        after = score_rollout(agent, batch, 1.0).logprobs
    return logprobs.detach(), after, grads


before, after_naive, _ = sgd_step(values)
_, after_advantage, grad_textbook = sgd_step(advantages)
change_naive, change_advantage = after_naive - before, after_advantage - before  # (B, T)
up_naive = float(masked_mean((change_naive > 0).float(), mask))
agree = float(masked_mean(((advantages > 0) == (change_advantage > 0)).float(), mask))
gain = float(masked_mean(advantages * change_advantage, mask))
below = (batch.scores < 0)[:, None] & mask  # tokens of responses the reward model scored negative
rose_naive, rose_advantage = (float((change > 0)[below].float().mean()) for change in (change_naive, change_advantage))
print(f"critic's V_t > 0 on {float(masked_mean((values > 0).float(), mask)):.0%} of tokens")
print(f"naive step on -mean(V_t log pi): log pi rose on {up_naive:.0%} of tokens; on the tokens of the "
      f"{int((batch.scores < 0).sum())} negatively scored responses: {rose_naive:.0%}")  # fmt: skip
print(f"advantage step on -mean(A_t log pi): {agree:.0%} of tokens moved with the sign of A_t; "
      f"negatively scored responses' tokens rose on {rose_advantage:.0%}")  # fmt: skip
print(f"mean(A * change of log pi) = {gain:+.4f} (> 0: the loss went down)")

# PPO's loss at ratio 1 has the same gradient as the textbook loss.
agent = copy.deepcopy(warm)
logprobs = score_rollout(agent, batch, 1.0).logprobs
ppo, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, config.clip_range)
grad_ppo = torch.autograd.grad(ppo, list(agent.policy.parameters()))
difference = max(float((a - b).abs().max()) for a, b in zip(grad_textbook, grad_ppo))
size = max(float(g.abs().max()) for g in grad_ppo)
print(f"gradients of -mean(A log pi) and of policy_loss at ratio 1: max |difference| = {difference:.1e} "
      f"(largest entry {size:.1e})")  # fmt: skip

# The game example on a real row: the critic expected V(s_0), the response earned G_0.
row = int(advantages[:, 0].argmax()) if args.episode is None else args.episode
steps = int(mask[row].sum())
v0, g0 = float(values[row, 0]), float(returns_to_go[row, 0])
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
score = float(batch.scores[row])
print(f"the critic expected V(s_0) = {v0:+.2f}; the response earned G_0 = {g0:+.2f} (score {score:+.2f}, "
      f"KL terms {g0 - score:+.2f}); advantage A_0 = {g0 - v0:+.2f}")  # fmt: skip
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "V_t": float(values[row, t]), "G_t": float(returns_to_go[row, t]),
     "A_t": float(advantages[row, t]), "log_pi_before": float(before[row, t]),
     "change_naive": float(change_naive[row, t]), "change_advantage": float(change_advantage[row, t])}
    for t in range(steps)
]  # fmt: skip
print_table(table, "one episode: V_t, G_t, A_t = G_t - V_t, and how log pi moved under each loss")
save_json(
    args.out,
    "08_actor_loss.json",
    {"lr": args.lr, "episode": row, "score": score, "loss_ppo": ppo.item(),
     "grad_max_difference": difference, "grad_max": size, "up_fraction_naive": up_naive,
     "sign_agreement": agree, "mean_advantage_times_change": gain, "tokens": table,
     "all": {"values": values[mask].tolist(), "returns": returns_to_go[mask].tolist(),
             "advantages": advantages[mask].tolist(), "change_naive": change_naive[mask].tolist(),
             "change_advantage": change_advantage[mask].tolist(),
             "score": batch.scores[:, None].expand_as(mask)[mask].tolist()}},
)  # fmt: skip

fig = Figure(figsize=(15, 4.8))
left, middle, right = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
colors = ["tab:blue" if s > 0 else "tab:red" for s in batch.scores[:, None].expand_as(mask)[mask]]
for ax, weight, change, name in ((left, values, change_naive, "V_t"), (middle, advantages, change_advantage, "A_t")):
    ax.scatter(weight[mask], change[mask], s=12, c=colors, alpha=0.7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=0.01)  # linear within ±0.01, logarithmic beyond
    ax.set_xlabel(f"weight {name} of the token")
    ax.set_ylabel("change of log pi(a_t|s_t) after one step (symlog)")
left.set_title(
    f"-mean(V_t log pi): {up_naive:.0%} of tokens pushed up\n(red: tokens of negatively scored responses)", fontsize=10
)
middle.set_title(f"-mean(A_t log pi): {agree:.0%} move with the sign of A_t", fontsize=10)
x = torch.arange(steps)
right.bar(x - 0.27, [r["V_t"] for r in table], 0.27, color="tab:grey", label="V_t (predicted)")
right.bar(x, [r["G_t"] for r in table], 0.27, color="tab:green", label="G_t (obtained)")
right.bar(x + 0.27, [r["A_t"] for r in table], 0.27, color="tab:blue", label="A_t = G_t - V_t")
right.axhline(0, color="grey", lw=0.8)
right.set_xticks(x, tokens, rotation=60)
right.set_title(f"{batch.prompts[row]!r} → {batch.responses[row]!r}\nexpected {v0:+.2f}, earned {g0:+.2f}: "
                f"advantage {g0 - v0:+.2f}", fontsize=9)  # fmt: skip
right.legend(fontsize=8)
fig.suptitle("The actor loss: weigh log pi by the value (every token goes up) or by the advantage (better or worse "
             "than expected)")  # fmt: skip
fig.tight_layout()
save_figure(fig, args.out, "08_actor_loss.png")
